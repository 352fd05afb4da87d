"""Argument checks shared across attnkit, so that every module words its errors the same way."""

from __future__ import annotations

import operator


def positive_int(owner: str, name: str, value: object) -> int:
    """Return ``value`` as an int when it is a positive integer (numpy integers included).

    Raises TypeError naming ``owner`` and ``name`` for a non-integer (``bool`` included) and
    ValueError for an integer ``<= 0``.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if number <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {number}")
    return number
