"""Ctrl-C and SIGTERM: one handler for the whole run, so every stop is a clean one.

Launchers stop a run with SIGTERM (torchrun forwarding its own, SLURM at the time limit, `docker stop`,
`timeout`), users with Ctrl-C. Python turns only SIGINT into KeyboardInterrupt; SIGTERM's default kills
the process on the spot, so no `finally` runs: a split being copied to a temporary directory stays in
$TMPDIR, a CSV misses run.json's final status. `Interrupts` is installed at the very start of train.py's
`main()` and turns both signals into the same KeyboardInterrupt, so the clean-ups on the way out run for
either, wherever the run is, and the exit code is 130 (feedrate.errors.run_cli).

Where the interruption lands matters, so the handler has two modes, nested as blocks:

- immediate (the default, and `immediate()`): the signal raises KeyboardInterrupt at once. Right for
  set-up (a copy of a remote split stops mid-transfer) and for the batch loop (a blocked fetch, a long
  step).
- deferred (`deferred()`): the signal is only noted; `check()` raises it at the next safe point. Right
  where clean-up code runs: an exception raised inside a DataLoader iterator's `__del__` is printed
  and swallowed, and one raised while run.json is being written or workers are being stopped would
  cut that short. A deferred block that nobody checks afterwards (the final save and close) simply
  ignores the signal, which is what a clean-up needs.

Only the first signal counts: the clean-up it starts is never cut short by a second one (torchrun
forwards the signal it gets, and a peer's exit may make it send another). Nor does a signal that was
only noted raise later, when a block ends: only `check()` raises it.

The first signal also sets SIGCHLD back to its default until the handler is removed: torchrun signals
each rank's whole process group, and torch's SIGCHLD handler would otherwise raise about DataLoader
workers that die of the same signal in the middle of the clean-up.

Outside the main thread (an embedding that runs train.main in a thread) nothing is installed: Python
delivers signals to the main thread only.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts(contextlib.AbstractContextManager):
    """Within the block, the process's SIGINT/SIGTERM handler (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._immediate = True
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        self._immediate = False  # a signal arriving while the handlers are put back is only noted
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self._saved:
            self._saved.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        if self._immediate:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def _mode(self, immediate: bool) -> Iterator[None]:
        outer, self._immediate = self._immediate, immediate
        try:
            yield
        finally:
            self._immediate = outer

    def immediate(self) -> contextlib.AbstractContextManager[None]:
        """A block that a signal interrupts at once; one that came before it raises on entry."""
        self.check()
        return self._mode(True)

    def deferred(self) -> contextlib.AbstractContextManager[None]:
        """A block in which a signal is only noted: `check()` raises it, nothing else does."""
        return self._mode(False)

    def requested(self) -> bool:
        """Whether a signal came. A method, so a signal still pending when it is called is handled
        first (CPython runs signal handlers on calls)."""
        return self.signum is not None

    def check(self) -> None:
        """Raise KeyboardInterrupt if a signal came."""
        if self.signum is not None:
            raise KeyboardInterrupt
