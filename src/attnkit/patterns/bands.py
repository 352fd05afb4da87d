"""Band patterns: the allowed set is ``lo <= i - j <= hi`` (Full, Causal, SlidingWindow)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import positive_int
from .base import Band, Pattern, _band_allows


@dataclass(frozen=True)
class Full(Pattern):
    """Every query sees every key (bidirectional attention, as in BERT)."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _band_allows(self.band(), i, j)

    def band(self) -> Band:
        return (-math.inf, math.inf)


@dataclass(frozen=True)
class Causal(Pattern):
    """A query sees itself and every earlier key: ``j <= i``."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _band_allows(self.band(), i, j)

    def band(self) -> Band:
        return (0, math.inf)


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """The ``size`` most recent keys, self included: ``0 <= i - j < size``.

    With ``causal=False`` the window is symmetric: ``abs(i - j) < size`` (``2 * size - 1`` keys).
    ``SlidingWindow(16)`` is the seed's "the last 16 tokens".
    """

    size: int
    causal: bool = True

    def __post_init__(self) -> None:
        positive_int("SlidingWindow", "size", self.size)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _band_allows(self.band(), i, j)

    def band(self) -> Band:
        return (0 if self.causal else -(self.size - 1), self.size - 1)
