"""Reader threads handing their batches to the consumer in a fixed order, without pickling.

Why threads, not DataLoader worker processes: at 32x32 the hand-off between processes (pickling each
batch, copying it through shared memory, a second copy of torch per worker) cost more per image than
decoding it. What a reader spends its time in releases the GIL -- file and socket reads, sha256,
numpy gathers, torch ops, libjpeg-turbo and libpng decodes (two threads measured using ~1.7-1.9
cores) -- so threads in the consumer's process run in parallel and hand a batch on by reference.

Order: each reader has a queue of its own, and the consumer takes from them round-robin (reader 0, 1,
..., N-1, 0, ...; a reader that has finished drops out of the turn), never first-come: the sequence of
batches is then a function of what each reader produces, so of (seed, epoch, worker count), however the
threads are scheduled.

Each reader thread runs with one torch intra-op thread (`torch.set_num_threads` is a per-thread setting;
the consumer's own count is left as it was), so N readers use N cores and do not oversubscribe the
cores the model needs. But torch (observed with 2.14) takes the last count set, in any thread, as the
count of a thread that has not run a parallel op yet: a reader's `set_num_threads(1)` before the
consumer's first op left the consumer (the training loop) at one thread. So the consumer's count is read
(which fixes it for its thread) before the readers start.

Hand-off time (the `queue` stage, loaders.stagetimes): with a `StageTimes`, the consumer counts each
`get_nowait()` of a batch already waiting in its reader's queue; when the batch is not there yet it waits
with a blocking `get()`, which is not counted -- that is waiting for a reader still producing, not the
hand-off. Batches go by reference (threads), so the hand-off is a lock and a deque pop: microseconds.

Stopping: `stop()` (an abandoned epoch, `close()`) tells the readers to stop, empties their queues and
waits for them: a reader notices at its next hand-off, or when the read it is waiting on returns.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loaders.stagetimes import StageTimes

POLL_S = 0.05  # how often a reader blocked on a full queue looks whether it was told to stop


def keep_consumer_threads() -> None:
    """Fix the calling (consuming) thread's torch intra-op count before threads it starts set theirs to
    one (`worker_torch_threads`): reading it is what fixes it (see the module docstring)."""
    torch.get_num_threads()


def worker_torch_threads() -> None:
    """One torch intra-op thread for the calling worker thread (a per-thread setting): N workers, N
    cores, none taken from the model's."""
    torch.set_num_threads(1)


@dataclass(frozen=True)
class Failed:
    """A reader's last message when its work raised: the consumer re-raises `error` itself."""

    error: BaseException


class ReaderThreads:
    """Runs `jobs` (each a callable returning an iterator of messages) in one thread each, and yields
    their messages round-robin (see the module docstring); at most `depth` messages wait per reader."""

    def __init__(
        self,
        jobs: list[Callable[[], Iterator[Any]]],
        depth: int,
        name: str = "reader",
        stages: StageTimes | None = None,
    ) -> None:
        keep_consumer_threads()
        self._stop = threading.Event()
        self._stages = stages
        self._queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, depth)) for _ in jobs]
        self._threads = [
            threading.Thread(target=self._run, args=(job, q), name=f"{name}-{i}", daemon=True)
            for i, (job, q) in enumerate(zip(jobs, self._queues, strict=True))
        ]
        for thread in self._threads:
            thread.start()

    def _put(self, q: queue.Queue, message: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(message, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, job: Callable[[], Iterator[Any]], q: queue.Queue) -> None:
        worker_torch_threads()
        messages = None
        try:
            messages = job()
            for message in messages:
                if not self._put(q, message):
                    return
            self._put(q, END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(q, Failed(exc))
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        for _, message in in_turn(self, deque(range(len(self._queues)))):
            yield message

    def take(self, reader: int) -> Any:
        """Reader `reader`'s next message, END once its work has ended; a reader's failure is raised
        here, after every reader was stopped. For a consumer that keeps the turn itself (a resumed
        epoch starts mid-turn: loaders.streaming)."""
        message = self._take(self._queues[reader])
        if isinstance(message, Failed):
            self.stop()
            raise message.error
        return message

    def _take(self, q: queue.Queue) -> Any:
        """The reader's next message: a ready one's hand-off is timed (`queue`), a wait for one is not."""
        if self._stages is None:
            return q.get()
        try:
            with self._stages.timed("queue"):
                return q.get_nowait()
        except queue.Empty:
            return q.get()

    def stop(self) -> None:
        """Stop every reader and wait for it (safe to call twice)."""
        self._stop.set()
        for thread, q in zip(self._threads, self._queues, strict=True):
            while thread.is_alive():
                _drain(q)
                thread.join(POLL_S)
            _drain(q)


END = object()  # a reader's last message when its work ended normally


class Source(Protocol):
    def take(self, reader: int) -> Any: ...


def in_turn(source: Source, turn: deque[int]) -> Iterator[tuple[int, Any]]:
    """(reader, message) from `source`'s readers in the fixed turn `turn` (round-robin; a reader whose
    work has ended leaves it). `turn` is kept up to date in place as each message is taken -- the taking
    reader already back at its end when its message is yielded -- so a consumer that must resume an epoch
    mid-turn (loaders.streaming) can save it and start from it again."""
    while turn:
        reader = turn.popleft()
        message = source.take(reader)
        if message is END:
            continue  # this reader is done: it leaves the turn
        turn.append(reader)
        yield reader, message


class InlineReader:
    """One reader run in the consumer's own thread (no threads), with `ReaderThreads`' take/stop."""

    def __init__(self, messages: Iterator[Any]) -> None:
        self._messages = messages

    def take(self, reader: int) -> Any:
        return next(self._messages, END)

    def stop(self) -> None:
        close = getattr(self._messages, "close", None)
        if close is not None:
            close()


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
