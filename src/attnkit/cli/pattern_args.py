"""The one spelling of an attention pattern on the command line, shared by every subcommand.

``full``, ``causal``, ``window:SIZE`` (causal), ``window-bidi:SIZE``, ``strided:STRIDE``,
``fixed:STRIDE:SUMMARY``, ``document:LENGTHS`` and ``causal-document:LENGTHS`` (packed documents,
``LENGTHS`` comma-separated: ``document:3,0,5``), with whole numbers up to :data:`MAX_NUMBER` that the pattern accepts
(``window:0`` is refused by ``SlidingWindow``, named). A command that also has options for the
numbers (``attnkit patterns --window 8 --stride 4 --summary 1``) passes them as ``defaults``,
keyed by placeholder (``{"SIZE": 8, "STRIDE": 4, "SUMMARY": 1}``); a bare name then takes them
(``window`` means ``window:8``), and the pattern's own constructor judges those values; a number
given both ways (``window:3 --window 9``) is the command's to refuse (:func:`spelled_numbers`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Sequence

from ..patterns import Causal, Document, Fixed, Full, Pattern, SlidingWindow, Strided


MAX_NUMBER = 2**62
"""The largest number a spelling takes: positions are int64, and a band's bounds are added to them."""


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
    "document": _Spelling(("LENGTHS",), Document, lambda lengths: f"documents {_listed(lengths)}"),
    "causal-document": _Spelling(("LENGTHS",), lambda lengths: Causal() & Document(lengths),
                                 lambda lengths: f"causal in documents {_listed(lengths)}"),
}
_NUMBER = "[0-9]+"  # [0-9] and not str.isdigit: "²" and "١" are digits to Python but no number on a command line
_FORMS = {"LENGTHS": f"{_NUMBER}(,{_NUMBER})*"}
"""Placeholders that take more than one number, and how they are written (others: one number)."""


def _listed(lengths: Sequence[int]) -> str:
    return ",".join(map(str, lengths)) if len(lengths) <= 8 else f"{','.join(map(str, lengths[:8]))},... ({len(lengths)})"


def _value(placeholder: str, text: str):
    return [int(n) for n in text.split(",")] if placeholder in _FORMS else int(text)


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
    values = None
    if spelling is not None:
        wanted = spelling.placeholders
        if not numbers and defaults is not None and all(p in defaults for p in wanted):
            values = [defaults[p] for p in wanted]
        elif len(numbers) == len(wanted) and all(re.fullmatch(_FORMS.get(p, _NUMBER), n) for p, n in zip(wanted, numbers)):
            values = [_value(p, n) for p, n in zip(wanted, numbers)]
    if values is not None:
        for placeholder, value in zip(wanted, values):
            largest = max(value) if isinstance(value, list) else value
            if largest > MAX_NUMBER:
                raise ValueError(f"{option} {text}: {placeholder} {largest} is more than 2**62, "
                                 "the most that attnkit's int64 positions hold")
        try:  # the pattern judges its numbers (a window of 0, a summary above the stride)
            return spelling.title(*values), spelling.make(*values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{option} {text}: {exc}") from None
    accepted = " | ".join([*also, pattern_syntax(defaults or ())])
    raise ValueError(f"{option} must be one of {accepted}, got {text!r}")


def parse_pattern(text: str) -> Pattern:
    """The pattern ``text`` spells, every number written out (see :func:`parse_titled_pattern`)."""
    return parse_titled_pattern(text)[1]


def spelled_numbers(text: str) -> tuple[str, ...]:
    """The placeholders whose numbers ``text`` writes out: ``("SIZE",)`` for ``window:3``; none
    for a bare ``window`` or for what is no spelling (``fixed:4``, ``foo:1``). A command with
    options for the numbers uses it to refuse a number given both ways."""
    name, *numbers = text.split(":")
    spelling = _SPELLINGS.get(name)
    if spelling is None or not numbers or len(numbers) != len(spelling.placeholders):
        return ()
    return spelling.placeholders


__all__ = ["parse_pattern", "parse_titled_pattern", "pattern_syntax", "spelled_numbers"]
