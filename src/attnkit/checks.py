"""Argument checks shared across attnkit, so that every module words its errors the same way."""

from __future__ import annotations

import math
import numbers
import operator

import numpy


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


def boolean(owner: str, name: str, value: object) -> bool:
    """Return ``value`` as a bool when it is one (numpy booleans included).

    Raises TypeError naming ``owner`` and ``name`` otherwise: a string such as ``"false"`` or an
    integer is refused rather than read by truthiness.
    """
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{owner}: {name} must be True or False, got {type(value).__name__} {value!r}")


def finite_real(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a float when it is a finite real number (numpy numbers included, bool not).

    Raises TypeError naming ``owner`` and ``name`` for a non-number, ValueError for NaN or infinity.
    """
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (10**400) is not finite as a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be finite, got {_short(value)}")
    return number


def _short(value: object) -> str:
    """``repr(value)``, cut short: a huge integer would otherwise fill the whole error."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else f"{text[:57]}..."
