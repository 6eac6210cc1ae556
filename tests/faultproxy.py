"""The fault-injection proxy for tests, and the faults table (`make test-faults`).

The proxy itself (`FaultProxy`, `Exchange`, the `Fault` classes) lives in rig/netproxy.py, because
`make bench` shapes the network with it too; see that module for what each fault does. It is re-exported
here under the names the tests know. What stays here needs pytest: the outcomes of fault-injection runs
and the table conftest.py prints at the end of a session.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rig.netproxy import (
    CHUNK,
    HOST,
    Answer,
    CutBody,
    CutRequest,
    Exchange,
    Fault,
    FaultProxy,
    LogEntry,
    Message,
    NetProxy,
    Reset,
    Stall,
    Truncate,
    _Peer,
)

__all__ = [
    "CHUNK",
    "HOST",
    "RESULTS",
    "TALLY_KEY",
    "Answer",
    "CutBody",
    "CutRequest",
    "Exchange",
    "Fault",
    "FaultProxy",
    "FaultTally",
    "LogEntry",
    "Message",
    "NetProxy",
    "Outcome",
    "Reset",
    "Stall",
    "Truncate",
    "_Peer",
]


# -- the faults table (`make test-faults`) ----------------------------------------------------------
@dataclass
class Outcome:
    """What one fault-injection run came to."""

    path: str  # the part of the data path under test, e.g. "wds loader (s3)"
    fault: str  # Fault.label
    injected: int  # faults the proxy served
    result: str  # "survived" | "failed cleanly" | "unclean"
    lost: int  # samples missing, duplicated or foreign in what the run delivered
    retries: int  # retries the run's counters recorded


RESULTS = ("survived", "failed cleanly", "unclean")


@dataclass
class FaultTally:
    """Outcomes collected over a test session, printed as one table at its end (conftest.py)."""

    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        if outcome.result not in RESULTS:
            raise ValueError(f"unknown result {outcome.result!r}; accepted: {', '.join(RESULTS)}")
        self.outcomes.append(outcome)

    def table(self) -> str:
        head = (
            "path",
            "fault",
            "injected",
            "survived",
            "failed cleanly",
            "unclean",
            "samples lost",
            "retries",
        )
        rows: dict[tuple[str, str], list[int]] = {}
        for o in self.outcomes:
            row = rows.setdefault((o.path, o.fault), [0] * 6)
            row[0] += o.injected
            row[1 + RESULTS.index(o.result)] += 1
            row[4] += o.lost
            row[5] += o.retries
        total = [sum(r[i] for r in rows.values()) for i in range(6)]
        lines = [(*key, *map(str, row)) for key, row in rows.items()]
        lines.append(("total", "", *map(str, total)))
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]

        def fmt(cells: tuple[str, ...]) -> str:
            left = [c.ljust(w) for c, w in zip(cells[:2], widths[:2], strict=True)]
            right = [c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True)]
            return "  ".join(left + right)

        rule = "-" * len(fmt(head))
        return "\n".join([fmt(head), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1])])


TALLY_KEY = pytest.StashKey[FaultTally]()
