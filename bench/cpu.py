"""The emulated endpoint's share of the CPUs: the local S3 server and the shaping proxy run on the machine
whose loaders they feed, so the bench reports how much of its CPUs they took while a variant was timed.

The bench names the endpoint's processes in `ENDPOINT_PIDS_ENV`; the variant's own process (bench.measure)
reads their CPU time before and after its timed passes.
"""

from __future__ import annotations

import os
from pathlib import Path

ENDPOINT_PIDS_ENV = "FEEDRATE_ENDPOINT_PIDS"  # set by the bench: the local S3 server's and the proxy's


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def endpoint_pids() -> list[int]:
    """The endpoint's processes, as the bench named them (none when it named none)."""
    return [int(p) for p in os.environ.get(ENDPOINT_PIDS_ENV, "").split(",") if p.strip().isdigit()]


def cpu_of(pids: list[int]) -> float:
    """CPU seconds the processes `pids` have used, summed."""
    return sum(process_cpu_s(pid) for pid in pids)
