"""The one spelling of an attention pattern on the command line, shared by every subcommand.

``full``, ``causal``, ``window:SIZE`` (causal), ``window-bidi:SIZE``, ``strided:STRIDE`` and
``fixed:STRIDE:SUMMARY``, with positive whole numbers. A command that also has options for the
numbers (``attnkit patterns --window 8 --stride 4 --summary 1``) passes them as ``defaults``,
keyed by placeholder (``{"SIZE": 8, "STRIDE": 4, "SUMMARY": 1}``); a bare name then takes them
(``window`` means ``window:8``), and the pattern's own constructor judges those values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Sequence

from ..patterns import Causal, Fixed, Full, Pattern, SlidingWindow, Strided


@dataclass(frozen=True)
class _Spelling:
    placeholders: tuple[str, ...]
    make: Callable[..., Pattern]
    title: Callable[..., str]


_SPELLINGS = {
    "full": _Spelling((), Full, lambda: "full"),
    "causal": _Spelling((), Causal, lambda: "causal"),
    "window": _Spelling(("SIZE",), SlidingWindow, lambda size: f"sliding window {size}"),
    "window-bidi": _Spelling(("SIZE",), lambda size: SlidingWindow(size, causal=False),
                             lambda size: f"bidirectional sliding window {size}"),
    "strided": _Spelling(("STRIDE",), Strided, lambda stride: f"strided, stride {stride}"),
    "fixed": _Spelling(("STRIDE", "SUMMARY"), Fixed,
                       lambda stride, summary: f"fixed, stride {stride}, summary {summary}"),
}


def pattern_syntax(defaulted: Collection[str] = ()) -> str:
    """``"full | causal | window:SIZE | ..."``; numbers whose placeholders are ``defaulted`` are
    shown optional (``window[:SIZE]``)."""
    spelled = []
    for name, spelling in _SPELLINGS.items():
        numbers = "".join(f":{p}" for p in spelling.placeholders)
        optional = numbers and all(p in defaulted for p in spelling.placeholders)
        spelled.append(f"{name}[{numbers}]" if optional else f"{name}{numbers}")
    return " | ".join(spelled)


def parse_titled_pattern(
    text: str, *, option: str = "--pattern", defaults: Optional[Mapping[str, int]] = None,
    also: Sequence[str] = (),
) -> tuple[str, Pattern]:
    """``(title, pattern)`` for ``text``: the title reads as prose (``"strided, stride 4"``).

    Raises ValueError naming ``option`` and listing every accepted spelling (plus the command's
    own words in ``also``) when ``text`` is none of them; a bare name whose numbers have
    ``defaults`` is built from them, and the pattern raises if they are out of range.
    """
    name, *numbers = text.split(":")
    spelling = _SPELLINGS.get(name)
    if spelling is not None:
        wanted = spelling.placeholders
        if not numbers and defaults is not None and all(p in defaults for p in wanted):
            values = [defaults[p] for p in wanted]
            return spelling.title(*values), spelling.make(*values)
        if len(numbers) == len(wanted) and all(n.isdigit() and int(n) > 0 for n in numbers):
            values = [int(n) for n in numbers]
            return spelling.title(*values), spelling.make(*values)
    accepted = " | ".join([*also, pattern_syntax(defaults or ())])
    raise ValueError(f"{option} must be one of {accepted}, got {text!r}")


def parse_pattern(text: str, *, option: str = "--pattern", defaults: Optional[Mapping[str, int]] = None) -> Pattern:
    """The pattern ``text`` spells (see :func:`parse_titled_pattern`)."""
    return parse_titled_pattern(text, option=option, defaults=defaults)[1]


__all__ = ["parse_pattern", "parse_titled_pattern", "pattern_syntax"]
