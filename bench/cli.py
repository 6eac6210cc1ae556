"""What the bench's two commands (`make bench`, `make compare`) share at their edge: the comma-separated
lists they accept, checked against the accepted names (their parser is feedrate.errors.CliParser)."""

from __future__ import annotations

from feedrate import network
from feedrate.errors import FeedrateError

# The presets a remote read can be shaped as ("loopback" is the unshaped default, never asked for).
SHAPED = tuple(n for n in network.PRESETS if n != "loopback")


def parse_list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Comma-separated names from `allowed`, in the order given; an unknown or empty list is a one-line
    error naming the bad ones and the accepted set."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise FeedrateError(f"unknown {what} {', '.join(bad) or '(none)'}; accepted: {', '.join(allowed)}")
    return items


def parse_nets(text: str) -> list[str]:
    """`--net`: "" (unshaped), `all`, or comma-separated shaped presets -> the presets to read through."""
    if not text:
        return []
    if text == "all":
        return list(SHAPED)
    return parse_list(text, SHAPED, "network preset")


def parse_ints(text: str, flag: str, minimum: int) -> list[int]:
    """Comma-separated integers >= `minimum` (e.g. `--workers 0,2`)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FeedrateError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or any(v < minimum for v in values):
        raise FeedrateError(f"{flag} {text!r}: expected comma-separated integers >= {minimum}")
    return values
