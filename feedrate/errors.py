"""User-facing errors.

A `FeedrateError` is bad input or an unusable environment that the user can fix: command-line entry
points print its message as one line and exit with code 2, without a traceback. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

EXIT_USAGE = 2

T = TypeVar("T")


class FeedrateError(Exception):
    """An error whose message alone tells the user what was wrong and what is accepted."""


def fail(prog: str, message: str) -> NoReturn:
    """Print `prog: error: message` on one line to stderr and exit with code 2."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def run_cli(prog: str, main: Callable[[], T]) -> T:
    """Run a command's body, turning FeedrateError and Ctrl-C into one-line exits."""
    try:
        return main()
    except FeedrateError as exc:
        fail(prog, str(exc))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
