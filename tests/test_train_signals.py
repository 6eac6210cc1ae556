"""Ctrl-C and SIGTERM in train.py: one handler (training.interrupts) from the start of main() to its end.

In-process, the handler's two modes and its rules (a signal raises at once, or only at `check()`; only
the first counts; a clean-up is never cut short; the process's handlers come back afterwards). Then a
real process: train.py on a remote dataset behind a slow link, stopped by a signal while its loaders
are still copying the split to a temporary directory -- the case where SIGTERM's default (death without
clean-up) used to leave the whole copy in $TMPDIR.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import make_dataset

import train
from feedrate import network
from rig import locals3
from rig.netproxy import NetProxy
from training.interrupts import Interrupts
from training.timing import Clock

REPO = Path(__file__).resolve().parents[1]


def send(sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal this process and give CPython the bytecode boundaries it needs to run the handler."""
    os.kill(os.getpid(), sig)
    for _ in range(50):
        time.sleep(0.01)


def test_a_signal_raises_at_once_outside_deferred_blocks_and_only_the_first_counts() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    reached = False
    with Interrupts() as interrupts:
        assert signal.getsignal(signal.SIGTERM) == interrupts._handle
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGTERM)
            reached = True
        assert not reached, "the signal interrupted the block at once"
        assert interrupts.requested() and interrupts.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL, "workers dying of it raise nothing"
        send(signal.SIGINT)  # a second one (torchrun forwards what it gets): ignored, even Ctrl-C
        assert interrupts.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before, "the process's handlers are back"


def test_a_deferred_signal_waits_for_check_and_a_later_immediate_block() -> None:
    with Interrupts() as interrupts:
        with interrupts.deferred():
            send(signal.SIGINT)
            assert interrupts.requested(), "noted"
            with pytest.raises(KeyboardInterrupt):
                interrupts.check()
            with pytest.raises(KeyboardInterrupt), interrupts.immediate():
                pytest.fail("an immediate block after a noted signal raises on entry")
        # Leaving the deferred block raises nothing by itself: only check() does.
        assert interrupts.requested()


def test_nothing_noted_nothing_raised() -> None:
    with Interrupts() as interrupts, interrupts.deferred():
        interrupts.check()
        with interrupts.immediate():
            pass
        assert not interrupts.requested()


class Batches:
    """A loader's iterator: `n` batches of 4 images, and a close() that takes a while (as stopping
    DataLoader workers does) and sends `signal_in_close` to the process half-way through."""

    def __init__(self, n: int, signal_in_close: signal.Signals | None = None) -> None:
        self.left = n
        self.signal_in_close = signal_in_close
        self.closed = False

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        return torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64)

    def close(self) -> None:
        if self.signal_in_close is not None:
            send(self.signal_in_close)
        self.closed = True


class FakeLoader:
    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __iter__(self) -> Batches:
        return self.batches

    def __len__(self) -> int:
        return 5


def test_run_epoch_a_signal_in_a_step_stops_the_loop_and_its_clean_up_still_runs() -> None:
    batches = Batches(5)
    steps: list[int] = []

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        steps.append(len(labels))
        if len(steps) == 2:
            send(signal.SIGTERM)  # a long step, interrupted half-way
            steps.append(-1)

    # train.py's loop runs deferred, each batch loop immediate
    with Interrupts() as interrupts, interrupts.deferred(), pytest.raises(KeyboardInterrupt):
        train.run_epoch(FakeLoader(batches), 5, step, Clock(), "t", bar=False, interrupts=interrupts)
    assert steps == [4, 4], "the step was cut at the signal, and no batch followed"
    assert batches.closed, "the iterator was closed on the way out"


def test_run_epoch_a_signal_during_the_clean_up_does_not_cut_it_short() -> None:
    batches = Batches(5, signal_in_close=signal.SIGTERM)
    with Interrupts() as interrupts, interrupts.deferred():
        stats = train.run_epoch(
            FakeLoader(batches), 3, lambda x, y: None, Clock(), "t", bar=False, interrupts=interrupts
        )
        assert batches.closed and stats.batches == 3 and stats.samples == 12
        assert interrupts.requested(), "noted, for the loop's next check()"


# -- a real process, stopped while its loaders are being built --------------------------------------
SLOW = network.Link("slow", 0.0, 0.0, 0.5 * network.MB, 1.0 * network.MB)  # ~4 s per batch file


def made(tmpdir: Path) -> list[str]:
    """What a run left in its TMPDIR, torch's own compile cache (torchinductor_<user>, created when
    torchvision imports torch._dynamo, and kept on purpose between runs) aside."""
    return sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_"))


@pytest.mark.parametrize(("loader", "sig"), [("torchvision", signal.SIGTERM), ("tensor", signal.SIGINT)])
def test_a_signal_while_loaders_copy_the_split_exits_130_and_leaves_no_copy(
    loader: str, sig: signal.Signals, bucket: str, s3_env: locals3.LocalS3, tmp_path: Path
) -> None:
    # 3,000 raw samples: five CIFAR batch files of ~1.8 MB in the train split, each seconds long on SLOW.
    url = make_dataset(f"s3://{bucket}/ds", 3000, 100, shard_size=1000)
    staging, out = tmp_path / "tmp", tmp_path / "run"
    staging.mkdir()
    with NetProxy(s3_env.endpoint, link=SLOW) as proxy:
        cmd = [sys.executable, str(REPO / "train.py"), "--loader", loader, "--data", url, "--out", str(out)]
        cmd += ["--device", "cpu", "--arch", "small", "--workers", "0", "--endpoint-url", proxy.endpoint]
        cmd += ["--net", "home"]  # a plan of few GETs at once: the rest of the copy is still to come
        env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(staging), "CI": "1"}
        env.pop(network.NET_ENV, None)
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 120
            while not [e for e in proxy.requests("GET", "data_batch") if e.first_byte is not None]:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            copies = made(staging)
            assert len(copies) == 1 and copies[0].startswith("feedrate-"), copies
            in_flight = [e for e in proxy.requests("GET", "data_batch") if e.done is None]
            assert in_flight, "the signal lands while the split is being copied"
            proc.send_signal(sig)
            stdout, stderr = proc.communicate(timeout=90)
            assert "results in" not in stdout
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().endswith("train.py: interrupted"), stderr
    assert len(proxy.requests("GET", "data_batch")) < 5, "the copy was stopped, not finished"
    assert made(staging) == [], "no temporary copy of the split is left behind"
    assert not out.exists(), "nothing was written: the run never got past its set-up"
