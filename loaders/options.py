"""The backend options (`LoaderConfig.options`), parsed one way for every loader.

Each backend declares the options it accepts as a table of name -> parser; `parse_options` checks a
given dict against it. Values come from Python (train.py passes `skip_bad=True`) or from a command
line (the bench passes "true", "4"), so the parsers take both. Errors are one line naming the backend,
the bad key or value, and what is accepted: an unknown key is never ignored, since a misspelt knob
that silently does nothing makes a measurement wrong without anyone noticing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from feedrate import network
from feedrate.errors import FeedrateError

# parser(backend, name, value) -> the parsed value; raises FeedrateError naming what is accepted
Parser = Callable[[str, str, Any], Any]

WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _bad(backend: str, name: str, value: Any, accepted: str, where: str = "") -> FeedrateError:
    return FeedrateError(
        f"{backend} option {name}={value!r}{' ' + where if where else ''}; accepted: {accepted}"
    )


def flag(backend: str, name: str, value: Any) -> bool:
    """A bool, or one of the words true/false, yes/no, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in WORDS:
        return WORDS[value.strip().lower()]
    raise _bad(backend, name, value, "true, false")


def count(low: int = 0, auto: bool = False) -> Parser:
    """An integer >= `low`, or its decimal string; with `auto`, "auto" (or None) parses to None."""
    accepted = f"auto or an integer >= {low}" if auto else f"an integer >= {low}"

    def parse(backend: str, name: str, value: Any) -> int | None:
        if auto and (value is None or (isinstance(value, str) and value.strip().lower() == "auto")):
            return None
        number = value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            number = int(value.strip())
        if isinstance(number, bool) or not isinstance(number, int) or number < low:
            raise _bad(backend, name, value, accepted)
        return number

    return parse


def fraction(backend: str, name: str, value: Any) -> float:
    """A number in [0, 1], or its string."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise _bad(backend, name, value, "a number in [0, 1]") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0.0 <= number <= 1.0:
        raise _bad(backend, name, value, "a number in [0, 1]")
    return float(number)


def choice(*accepted: str, where: str = "") -> Parser:
    """One of `accepted` (exactly); `where` says what the choices depend on (e.g. "for png shards")."""

    def parse(backend: str, name: str, value: Any) -> str:
        if value not in accepted:
            raise _bad(backend, name, value, ", ".join(accepted), where)
        return str(value)

    return parse


def net_preset(backend: str, name: str, value: Any) -> str:
    """A feedrate.network preset name ("" or None: none given)."""
    text = "" if value is None else str(value)
    if text:
        network.preset(text)  # an unknown name fails here, naming the accepted ones
    return text


def parse_options(backend: str, given: Mapping[str, Any], declared: Mapping[str, Parser]) -> dict[str, Any]:
    """The options in `given` parsed by `declared`'s parsers (only the keys given; defaults are the
    caller's). Any key `declared` lacks is a FeedrateError naming it and the accepted keys."""
    unknown = sorted(set(given) - set(declared))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise FeedrateError(
            f"unknown {backend} option{plural} {names}; accepted: {', '.join(sorted(declared))}"
        )
    return {name: declared[name](backend, name, value) for name, value in given.items()}


# The options of the loaders that read the CIFAR python batches (torchvision, tensor). Their batch files
# are verified whole by sha256, local or remote (`verify`, default true; false drops the check of files
# read in place), and there is nothing in them to skip, but `skip_bad` is accepted so one
# `train.py --skip-bad` serves every loader.
BATCH_READER_OPTIONS: dict[str, Parser] = {"net": net_preset, "skip_bad": flag, "verify": flag}
