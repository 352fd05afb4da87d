"""Patterns built from other patterns: one per query head, differences, and ``None`` as Full.

Union and Intersection (``a | b``, ``a & b``) live in :mod:`.base`, next to the operators that build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .bands import Full
from .base import Pattern, _check_pattern_args


@dataclass(frozen=True)
class PerHead(Pattern):
    """Query head ``h`` uses ``patterns[h]`` (e.g. half the heads local, half strided).

    Its ``allows`` returns a leading head dimension; the number of patterns must equal the
    number of query heads of the attention call.
    """

    patterns: tuple[Pattern, ...]
    n_heads: Optional[int] = field(init=False, default=None)

    def __post_init__(self) -> None:
        patterns = tuple(self.patterns)
        if not patterns:
            raise ValueError("PerHead: patterns must hold one pattern per query head, got none")
        _check_pattern_args("PerHead", *patterns)
        nested = [p for p in patterns if p.n_heads is not None]
        if nested:
            raise ValueError(f"PerHead: patterns must not themselves be per-head, got {nested[0]!r}")
        object.__setattr__(self, "patterns", patterns)
        object.__setattr__(self, "n_heads", len(patterns))

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(i.shape, j.shape)
        return torch.stack([p.allows(i, j).expand(shape) for p in self.patterns])

    def validate(self, n_q: int, n_k: int) -> None:
        for pattern in self.patterns:
            pattern.validate(n_q, n_k)


@dataclass(frozen=True, eq=False)
class Difference(Pattern):
    """Pairs of ``keep`` that ``drop`` does not allow: how a union is split into disjoint parts."""

    keep: Pattern
    drop: Pattern

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.keep.allows(i, j) & ~self.drop.allows(i, j)


def as_pattern(pattern: Optional[Pattern]) -> Pattern:
    """``None`` -> :class:`Full`; a :class:`Pattern` is returned as is; anything else is a TypeError."""
    if pattern is None:
        return Full()
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be an attnkit Pattern or None, got {type(pattern).__name__}"
        )
    return pattern
