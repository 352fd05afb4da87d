"""The sparse patterns of Child et al. (2019), "Generating Long Sequences with Sparse Transformers".

:class:`Strided` and :class:`Fixed` expose their two parts (``.parts``) so a model can give each
head or layer one of them; the parts are patterns of their own (:class:`SlidingWindow` and
:class:`Periodic`; :class:`BlockLocal` and :class:`Summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import positive_int
from .bands import SlidingWindow
from .base import SUMMARY, Pattern, Piece


@dataclass(frozen=True)
class Strided(Pattern):
    """Child et al. (2019), "Generating Long Sequences with Sparse Transformers", strided pattern.

    ``j <= i`` and (``i - j <= stride`` or ``(i - j) % stride == 0``): the recent keys plus every
    ``stride``-th earlier key. This is the paper's convention, whose local band ``0 <= i - j <= stride``
    holds ``stride + 1`` keys; OpenAI's released code uses a band of ``stride`` keys
    (``i - j < stride``), one fewer. ``parts`` are the paper's two heads, ``A(1)`` =
    ``SlidingWindow(stride + 1)`` and ``A(2)`` = ``Periodic(stride)``; their union is the whole
    and every ``j <= i`` is reachable from ``i`` in two steps (one in each part).
    """

    stride: int

    def __post_init__(self) -> None:
        positive_int("Strided", "stride", self.stride)

    @property
    def parts(self) -> tuple["SlidingWindow", "Periodic"]:
        return (SlidingWindow(self.stride + 1), Periodic(self.stride))

    @property
    def pieces(self) -> tuple[Piece, Piece]:
        """The band ``0 <= i - j <= stride``, and the periodic keys it does not hold: those of
        the query's residue at least two strides back."""
        return Piece(0, self.stride), Piece(2, math.inf, step=self.stride)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        # (i - j) % stride == 0 as equal residues: no int64 i - j table is broadcast.
        same_residue = (i % self.stride) == (j % self.stride)
        return (j <= i) & ((j >= i - self.stride) | same_residue)


@dataclass(frozen=True)
class Periodic(Pattern):
    """Every ``stride``-th key back from the query, self included: ``j <= i`` and
    ``(i - j) % stride == 0`` (the second part of :class:`Strided`)."""

    stride: int

    def __post_init__(self) -> None:
        positive_int("Periodic", "stride", self.stride)

    @property
    def parts(self) -> tuple["Periodic"]:
        return (self,)

    @property
    def pieces(self) -> tuple[Piece]:
        return (Piece(0, math.inf, step=self.stride),)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & ((i % self.stride) == (j % self.stride))


@dataclass(frozen=True)
class Fixed(Pattern):
    """Child et al. (2019) fixed pattern: ``j <= i`` and (``j // stride == i // stride`` or
    ``j % stride >= stride - summary``).

    Positions are cut into blocks of ``stride``; a query sees the earlier keys of its own block
    (``A(1)``) and the last ``summary`` keys ("summary cells", the paper's ``c``) of every block
    (``A(2)``), as in the paper's formula ``floor(j / l) == floor(i / l)`` /
    ``j mod l in {l - c, ..., l - 1}``. ``parts`` = ``(BlockLocal(stride), Summary(stride, summary))``,
    whose union is the whole. ``summary`` must lie in ``1 .. stride``.
    """

    stride: int
    summary: int

    def __post_init__(self) -> None:
        positive_int("Fixed", "stride", self.stride)
        _check_summary("Fixed", self.stride, self.summary)

    @property
    def parts(self) -> tuple["BlockLocal", "Summary"]:
        return (BlockLocal(self.stride), Summary(self.stride, self.summary))

    @property
    def pieces(self) -> tuple[Piece, Piece]:
        """The causal blocks, and the summary keys of earlier blocks (those of the query's own
        block are in its block already)."""
        return (
            Piece(0, self.stride - 1, segment=self.stride),
            Piece(0, math.inf, keys=SUMMARY, period=self.stride, width=self.summary),
        )

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        same_block = (j // self.stride) == (i // self.stride)
        return (j <= i) & (same_block | (j % self.stride >= self.stride - self.summary))


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """Causal attention inside blocks of ``stride`` positions: ``j <= i`` and
    ``j // stride == i // stride`` (the first part of :class:`Fixed`)."""

    stride: int

    def __post_init__(self) -> None:
        positive_int("BlockLocal", "stride", self.stride)

    @property
    def parts(self) -> tuple["BlockLocal"]:
        return (self,)

    @property
    def pieces(self) -> tuple[Piece]:
        return (Piece(0, self.stride - 1, segment=self.stride),)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & ((j // self.stride) == (i // self.stride))


@dataclass(frozen=True)
class Summary(Pattern):
    """The last ``summary`` keys of every block of ``stride`` positions, causally: ``j <= i`` and
    ``j % stride >= stride - summary`` (the second part of :class:`Fixed`)."""

    stride: int
    summary: int

    def __post_init__(self) -> None:
        positive_int("Summary", "stride", self.stride)
        _check_summary("Summary", self.stride, self.summary)

    @property
    def parts(self) -> tuple["Summary"]:
        return (self,)

    @property
    def pieces(self) -> tuple[Piece]:
        return (Piece(0, math.inf, keys=SUMMARY, period=self.stride, width=self.summary, own=True),)

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & (j % self.stride >= self.stride - self.summary)


def _check_summary(owner: str, stride: int, summary: object) -> None:
    positive_int(owner, "summary", summary)
    if summary > stride:
        raise ValueError(f"{owner}: summary must be at most stride ({stride}), got {summary}")
