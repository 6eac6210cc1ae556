"""Pid files that name the process the rig started, and only that process.

A pid file outlives what it names: after a reboot or a crash its number may belong to any process of
the user's, and `make s3-down` must not send that process SIGTERM and then SIGKILL. So a pid file holds
the pid and the process's start time (Linux: field 22 of /proc/<pid>/stat, clock ticks since boot), and
before the rig signals it, the process must still be the one written: alive, started at that time, and
running what the rig runs there (its command line names it). A file that fails this is stale: it is
removed, with a message saying why, and nothing is signalled.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROC = Path("/proc")


def start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None when it is not running."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: fields 3.. follow the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def command_line(pid: int) -> list[str] | None:
    """Process `pid`'s arguments, or None when it is not running."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def write(path: Path, pid: int) -> None:
    """Record process `pid` (just started by the rig) in `path`: its pid and start time."""
    started = start_ticks(pid)
    path.write_text(f"{pid} {started if started is not None else ''}".rstrip() + "\n")


def _names(argv: list[str], marker: str) -> bool:
    return any(arg == marker or Path(arg).name == marker for arg in argv)


def owned(path: Path, marker: str) -> int | None:
    """The pid recorded in `path` when that process is still the one the rig started there (its command
    line has an argument `marker`, e.g. "moto_server", and it started when the file says); otherwise
    None, with `path` removed and a line on stderr saying why. None too when there is no file."""
    if not path.exists():
        return None
    fields = path.read_text().split()
    reason = ""
    if not fields or not fields[0].isdigit() or (len(fields) > 1 and not fields[1].isdigit()):
        reason = f"{path} is not a pid file (expected 'PID START_TICKS', found {path.read_text()[:40]!r})"
    elif not PROC.joinpath("self").exists():
        # Without /proc a pid cannot be checked: better to leave the process than to kill a stranger.
        print(
            f"cannot check pid {fields[0]} from {path} on this system (no /proc); if it is the rig's "
            f"{marker}, stop it yourself: kill {fields[0]}",
            file=sys.stderr,
        )
        path.unlink()
        return None
    else:
        pid = int(fields[0])
        argv = command_line(pid)
        started = start_ticks(pid)
        if argv is None or started is None:
            reason = f"{path}: pid {pid} is not running"
        elif not _names(argv, marker):
            running = Path(argv[0]).name if argv else "?"
            reason = f"{path}: pid {pid} is another process ({running}), not the rig's {marker}"
        elif len(fields) > 1 and int(fields[1]) != started:
            reason = f"{path}: pid {pid} was started after the rig's {marker} (the pid was reused)"
        else:
            return pid
    print(f"{reason}: removed the stale pid file, signalled nothing", file=sys.stderr)
    path.unlink()
    return None
