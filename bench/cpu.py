"""CPU time from /proc: the emulated endpoint's share of the CPUs, and a variant's own process tree.

The local S3 server and the shaping proxy run on the machine whose loaders they feed, so the bench
reports how much of its CPUs they took while a variant was timed: the bench names the endpoint's
processes in `ENDPOINT_PIDS_ENV`, and the variant's own process (bench.measure) reads their CPU time
before and after its timed passes.

The variant's own cost is the CPU time of its process tree over the timed passes (`tree_cpu_s`): the
measuring process with all its threads (DALI's, torch's), its loader's worker processes, and the workers
that ended meanwhile (a DataLoader starts new ones each epoch). Per image, that figure hardly moves when
a noisy neighbour steals the CPUs, where wall-clock throughput does.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

ENDPOINT_PIDS_ENV = "FEEDRATE_ENDPOINT_PIDS"  # set by the bench: the local S3 server's and the proxy's
# /proc/<pid>/stat after the command's closing parenthesis: ppid, utime, stime, cutime, cstime positions
_PPID, _UTIME, _STIME, _CUTIME, _CSTIME = 1, 11, 12, 13, 14


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None when the
    process is gone or unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_s(pid: int, reaped_children: bool = False) -> float:
    """CPU seconds (user + system) process `pid` has used so far (Linux /proc; 0 where unreadable), with
    `reaped_children` also those of its children that ended and were waited for."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    positions = (_UTIME, _STIME, _CUTIME, _CSTIME) if reaped_children else (_UTIME, _STIME)
    return sum(int(fields[i]) for i in positions) / os.sysconf("SC_CLK_TCK")


def endpoint_pids() -> list[int]:
    """The endpoint's processes, as the bench named them (none when it named none)."""
    return [int(p) for p in os.environ.get(ENDPOINT_PIDS_ENV, "").split(",") if p.strip().isdigit()]


def cpu_of(pids: list[int]) -> float:
    """CPU seconds the processes `pids` have used, summed."""
    return sum(process_cpu_s(pid) for pid in pids)


def descendants(root: int) -> list[int]:
    """The living processes below `root` (children, grandchildren, ...), from every /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[_PPID]), []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        frontier = [c for p in frontier for c in children.get(p, [])]
        found += frontier
    return found


def tree_cpu_s() -> float:
    """CPU seconds (user + system) this process's tree has used so far: this process (all threads) and
    its ended, waited-for descendants from getrusage (microsecond resolution), plus each living
    descendant's own time and that of its ended children from /proc. The difference of two readings is
    the tree's CPU time in between, whether workers lived through it, started or ended in it."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime
    return total + sum(process_cpu_s(pid, reaped_children=True) for pid in descendants(os.getpid()))
