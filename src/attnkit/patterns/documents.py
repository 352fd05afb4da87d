"""Packed documents: several sequences in one row, no attention across them ("varlen").

``Document(lengths)`` allows query ``i`` to see key ``j`` iff both lie in the same document; it
composes with every other pattern (``Causal() & Document(lengths)`` is causal attention inside
each document, ``SlidingWindow(w) & Document(lengths)`` a window that stops at the document's
start). One set of lengths serves the whole batch. The lengths cover the ``Nk`` keys; with
``Nq < Nk`` the queries are the last ``Nq`` positions, as everywhere in attnkit, so checking the
sum against the key count happens when a call is made (:meth:`Document.validate`).

Its geometry is one :class:`~attnkit.patterns.Piece` with ``documents`` set (the cumulative
bounds, ``cu_seqlens``), and a band met with it keeps the cut: planners run each document's band
on its own, at the document's cost (:mod:`attnkit.kernels.sparse_plan`).

:func:`document_positions` gives the positions RoPE should see in packed rows: they restart at 0
in each document, so a packed row is rotated as its documents would be one by one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .base import Pattern, Piece
from .document_bounds import check_bounds, same_document


def _lengths(owner: str, lengths: object) -> tuple[int, ...]:
    """``lengths`` as a tuple of non-negative ints (TypeError / ValueError naming ``lengths``)."""
    if isinstance(lengths, torch.Tensor) and lengths.dim() == 1 and not lengths.dtype.is_floating_point:
        lengths = lengths.tolist()
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, (Sequence, torch.Tensor)):
        raise TypeError(f"{owner}: lengths must be a list of ints, got {type(lengths).__name__} {lengths!r}")
    if isinstance(lengths, torch.Tensor):
        raise TypeError(f"{owner}: lengths must be a 1-D integer tensor or a list of ints, "
                        f"got a {lengths.dim()}-D {lengths.dtype} tensor")
    if len(lengths) == 0:
        raise ValueError(f"{owner}: lengths must hold at least one document, got none")
    negative = [n for n in lengths if not isinstance(n, bool) and isinstance(n, int) and n < 0]
    if negative:
        raise ValueError(f"{owner}: lengths must be non-negative, got {negative[0]}")
    bounds = check_bounds(owner, "lengths", [0, *_cumulative(owner, lengths)])
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def _cumulative(owner: str, lengths: Sequence) -> list:
    total, sums = 0, []
    for n in lengths:
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"{owner}: lengths must hold ints, got {type(n).__name__} {n!r}")
        total += n.__index__()
        sums.append(total)
    return sums


@dataclass(frozen=True)
class Document(Pattern):
    """Query ``i`` sees key ``j`` iff both lie in the same document.

    Args:
        lengths: the documents' lengths in order (a list of ints, or a 1-D integer tensor), each
            ``>= 0`` (empty documents are allowed and hold no position); they must sum to the
            number of keys of each call the pattern is used in.

    Raises:
        TypeError: lengths that are not a list of ints (floats, bools, strings, nested lists).
        ValueError: no lengths, or a negative one; at call time (:meth:`validate`) lengths that
            do not sum to the call's key count.

    ``Document.from_cu_seqlens(cu_seqlens)`` takes the cumulative bounds instead
    (``[0, n0, n0 + n1, ...]``, FlashAttention's ``cu_seqlens``); :attr:`bounds` gives them back.
    """

    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", _lengths("Document", self.lengths))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: object) -> "Document":
        """The pattern of cumulative bounds ``cu_seqlens`` (a list or 1-D integer tensor starting
        at 0, non-decreasing, at least two entries). TypeError / ValueError name ``cu_seqlens``."""
        bounds = check_bounds("Document.from_cu_seqlens", "cu_seqlens", cu_seqlens)
        if len(bounds) < 2:
            raise ValueError(f"Document.from_cu_seqlens: cu_seqlens must hold at least two bounds, got {list(bounds)}")
        return cls([b - a for a, b in zip(bounds[:-1], bounds[1:])])

    @functools.cached_property
    def bounds(self) -> tuple[int, ...]:
        """Cumulative bounds ``(0, n0, n0 + n1, ..., total)``: document ``d`` is ``[bounds[d], bounds[d + 1])``."""
        sums, total = [0], 0
        for n in self.lengths:
            total += n
            sums.append(total)
        return tuple(sums)

    @property
    def total(self) -> int:
        """The number of positions the documents cover (the key count of a call)."""
        return self.bounds[-1]

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return same_document(self.bounds, i, j)

    def validate(self, n_q: int, n_k: int) -> None:
        if self.total != n_k:
            raise ValueError(
                f"Document: lengths must sum to the number of keys ({n_k}), got {self.total} "
                f"({len(self.lengths)} documents)"
            )

    @property
    def pieces(self) -> tuple[Piece]:
        return (Piece(-math.inf, math.inf, documents=self.bounds),)

    def positions(self, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """:func:`document_positions` of these lengths."""
        return document_positions(self.lengths, device=device)


def document_positions(lengths: object, *, device: Optional[torch.device | str] = None) -> torch.LongTensor:
    """Positions for RoPE in a packed row: ``int64 [sum(lengths)]``, restarting at 0 in each
    document (``[3, 2] -> [0, 1, 2, 0, 1]``). Pass them as ``positions=`` to
    :class:`~attnkit.nn.RotaryEmbedding` (or a layer's forward) so each document is rotated as
    if it stood alone. RoPE's scores depend on ``i - j`` only, so inside a document they agree
    with the packed row's positions up to rounding; restarting keeps the angles small (float32
    angles of large positions lose bits) and gives the positions models are trained with on
    packed rows (Hugging Face's ``position_ids``). ``lengths``: as :class:`Document` takes them
    (a ``Document`` too)."""
    lengths = lengths.lengths if isinstance(lengths, Document) else _lengths("document_positions", lengths)
    counts = torch.tensor(lengths, dtype=torch.long, device=device)
    starts = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    return torch.arange(total, device=device) - torch.repeat_interleave(starts, counts, output_size=total)


__all__ = ["Document", "document_positions"]
