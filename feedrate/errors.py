"""User-facing errors.

A `FeedrateError` is bad input or an unusable environment that the user can fix: command-line entry
points print its message as one line and exit with code 2, without a traceback. So is an `OSError` that
says the place being written cannot take it (a full disk or quota, a file size limit, a read-only or
forbidden location, a path through a file): the user fixes those, not the code. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_USAGE = 2
# OSError numbers that describe the user's file system, not a bug: reported in one line.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)

T = TypeVar("T")


class FeedrateError(Exception):
    """An error whose message alone tells the user what was wrong and what is accepted."""


class CliParser(argparse.ArgumentParser):
    """argparse whose usage errors are FeedrateErrors: parsed inside `run_cli`, a bad flag prints as one
    line and exits with code 2, as every other bad value does (argparse alone prints its usage block
    first). Every command line of the project uses it."""

    def error(self, message: str) -> NoReturn:
        raise FeedrateError(message)


def fail(prog: str, message: str) -> NoReturn:
    """Print `prog: error: message` on one line to stderr and exit with code 2."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def describe_os_error(exc: OSError) -> str:
    """`path: reason` for an OSError (both paths of a rename or copy), e.g. `/out/run.json: No space left
    on device`."""
    reason = exc.strerror or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    # A failed write() or flush() names no file: say at least that it was the file system.
    return f"{' -> '.join(paths)}: {reason}" if paths else f"writing output failed: {reason}"


def run_cli(prog: str, main: Callable[[], T]) -> T:
    """Run a command's body, turning FeedrateError, environment OSErrors (a full or read-only output
    location, ...) and Ctrl-C into one-line exits."""
    try:
        return main()
    except FeedrateError as exc:
        fail(prog, str(exc))
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        fail(prog, describe_os_error(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
