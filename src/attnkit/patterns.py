"""Attention patterns: which keys each query may see.

A pattern is a pure predicate on absolute positions: ``allows(i, j)`` is True when the query at
position ``i`` may attend to the key at position ``j``. Every execution path (dense masks, tile
skipping in the blockwise kernel, block layouts for plots and planners) is derived from that one
definition, so a pattern cannot mean two different things in two places.

Positions follow bottom-right alignment: with ``n_q`` queries and ``n_k`` keys, query row ``r`` sits
at absolute position ``r + (n_k - n_q)`` and key column ``c`` at position ``c``. This makes a causal
pattern correct for KV-cache decoding, where a few new queries see a long cache.

The sparse patterns of Child et al. (2019), :class:`Strided` and :class:`Fixed`, expose their two
parts (``.parts``) so a model can give each head or layer one of them. :class:`BlockSparse` allows
whole blocks of a layout.

Patterns whose allowed set is a diagonal band ``lo <= i - j <= hi`` (Full, Causal, SlidingWindow and
their intersections) report it through :meth:`Pattern.band`; kernels use it to skip tiles and to know
which tiles need no element mask without evaluating the predicate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .checks import positive_int

Band = tuple[float, float]
"""An inclusive range ``(lo, hi)`` of allowed ``i - j``; either end may be infinite."""

_ROW_CHUNK = 256  # query rows evaluated at once when a pattern has no closed form
_MASK_ELEMENTS = 1 << 22  # pairs evaluated at once when a dense mask is built


def query_key_positions(
    n_q: int, n_k: int, device: Optional[torch.device | str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions ``(q_pos[n_q], k_pos[n_k])`` (int64) under bottom-right alignment."""
    offset = n_k - n_q
    q_pos = torch.arange(offset, offset + n_q, device=device)
    k_pos = torch.arange(n_k, device=device)
    return q_pos, k_pos


class Pattern:
    """Base class of all patterns. Subclasses implement :meth:`allows`.

    ``n_heads`` is None for patterns that treat every head alike; :class:`PerHead` (and any
    composition containing it) sets it, and its ``allows``/``mask``/``block_layout`` results gain a
    leading head dimension.
    """

    n_heads: Optional[int] = None

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """BoolTensor: may query position ``i`` see key position ``j``? (broadcasting int64 tensors)"""
        raise NotImplementedError

    def band(self) -> Optional[Band]:
        """``(lo, hi)`` when the allowed set is exactly ``lo <= i - j <= hi``, else None."""
        return None

    def validate(self, n_q: int, n_k: int) -> None:
        """Raise ValueError when the pattern cannot describe an ``n_q x n_k`` problem (for
        example a block layout made for another length). Most patterns fit every size."""

    def mask(self, n_q: int, n_k: int, *, device: Optional[torch.device | str] = None) -> torch.Tensor:
        """Dense BoolTensor ``[n_q, n_k]`` (``[n_heads, n_q, n_k]`` for per-head patterns)."""
        positive_int(type(self).__name__ + ".mask", "n_q", n_q)
        positive_int(type(self).__name__ + ".mask", "n_k", n_k)
        self.validate(n_q, n_k)
        q_pos, k_pos = query_key_positions(n_q, n_k, device)
        shape = (n_q, n_k) if self.n_heads is None else (self.n_heads, n_q, n_k)
        allowed = torch.empty(shape, dtype=torch.bool, device=device)
        # A block of rows at a time, so whatever a predicate computes on the way (positions,
        # differences) is at most _MASK_ELEMENTS entries, never n_q x n_k.
        rows = max(1, _MASK_ELEMENTS // n_k)
        for start in range(0, n_q, rows):
            allowed[..., start : start + rows, :] = self.allows(q_pos[start : start + rows, None], k_pos[None, :])
        return allowed

    def rows_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Mask of the given position vectors: ``[len(q_pos), len(k_pos)]`` (per-head: leading H)."""
        return self._full_shape(self.allows(q_pos[:, None], k_pos[None, :]), len(q_pos), len(k_pos))

    def _full_shape(self, allowed: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
        shape = (n_q, n_k) if self.n_heads is None else (self.n_heads, n_q, n_k)
        return allowed.expand(shape)

    def block_layout(self, n_q: int, n_k: int, block_size: int) -> torch.Tensor:
        """BoolTensor ``[ceil(n_q/bs), ceil(n_k/bs)]``: which blocks hold at least one allowed pair.

        Blocks are cut from row 0 and column 0 of the ``n_q x n_k`` problem (the last block of
        each axis may be partial). Per-head patterns return ``[n_heads, ...]``.
        """
        owner = type(self).__name__ + ".block_layout"
        positive_int(owner, "n_q", n_q)
        positive_int(owner, "n_k", n_k)
        positive_int(owner, "block_size", block_size)
        self.validate(n_q, n_k)
        band = self.band()
        if band is not None:
            return _band_block_layout(band, n_q, n_k, block_size)
        q_pos, k_pos = query_key_positions(n_q, n_k)
        n_kb = -(-n_k // block_size)
        rows = []
        for start in range(0, n_q, block_size):
            m = self.rows_mask(q_pos[start : start + block_size], k_pos)  # (..., bq, n_k)
            m = torch.nn.functional.pad(m, (0, n_kb * block_size - n_k))
            m = m.unflatten(-1, (n_kb, block_size))  # (..., bq, n_kb, bs)
            rows.append(m.any(-1).any(-2))
        return torch.stack(rows, dim=-2)

    def count(self, n_q: int, n_k: int) -> int:
        """Number of allowed (query, key) pairs of an ``n_q x n_k`` problem (summed over heads)."""
        self.validate(n_q, n_k)
        band = self.band()
        if band is not None and self.n_heads is None:
            q_pos, _ = query_key_positions(n_q, n_k)
            return int(_band_row_counts(band, q_pos, n_k).sum())
        q_pos, k_pos = query_key_positions(n_q, n_k)
        total = 0
        for start in range(0, n_q, _ROW_CHUNK):
            total += int(self.rows_mask(q_pos[start : start + _ROW_CHUNK], k_pos).sum())
        return total

    def density(self, n: int) -> float:
        """Fraction of the full ``n x n`` square that is allowed (Causal gives ``(n + 1) / (2n)``).

        The denominator is always the full square, so densities of causal and non-causal
        patterns compare directly; per-head patterns report the mean over heads.
        """
        positive_int(type(self).__name__ + ".density", "n", n)
        return self.count(n, n) / (n * n * (self.n_heads or 1))

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union(self, other)

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection(self, other)


def _band_row_counts(band: Band, q_pos: torch.Tensor, n_k: int) -> torch.Tensor:
    """For each query position, how many keys in ``[0, n_k)`` satisfy ``lo <= i - j <= hi``."""
    lo, hi = band
    first = (q_pos - hi).clamp(min=0) if math.isfinite(hi) else torch.zeros_like(q_pos)
    last = (q_pos - lo).clamp(max=n_k - 1) if math.isfinite(lo) else torch.full_like(q_pos, n_k - 1)
    return (last - first + 1).clamp(min=0)


def _band_block_layout(band: Band, n_q: int, n_k: int, block_size: int) -> torch.Tensor:
    lo, hi = band
    q_pos, k_pos = query_key_positions(n_q, n_k)
    q_first, q_last = q_pos[::block_size], q_pos[block_size - 1 :: block_size]
    q_last = torch.cat([q_last, q_pos[-1:]])[: len(q_first)]
    k_first, k_last = k_pos[::block_size], k_pos[block_size - 1 :: block_size]
    k_last = torch.cat([k_last, k_pos[-1:]])[: len(k_first)]
    # Within a block pair, i - j covers [q_first - k_last, q_last - k_first].
    d_min = q_first[:, None] - k_last[None, :]
    d_max = q_last[:, None] - k_first[None, :]
    return (d_max >= lo) & (d_min <= hi)


def _band_allows(band: Band, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    # lo <= i - j <= hi as j <= i - lo and j >= i - hi: the shifts are taken of the index
    # vectors, so the only broadcast result is the boolean one (no int64 i - j table).
    lo, hi = band
    allowed = None
    if math.isfinite(lo):
        allowed = j <= i - _offset(math.ceil(lo))
    if math.isfinite(hi):
        reach = j >= i - _offset(math.floor(hi))
        allowed = reach if allowed is None else allowed & reach  # not in place: FlexAttention compiles this
    if allowed is None:
        return torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
    return allowed


def _offset(edge: int) -> int:
    """A band edge clamped into int64 range (an edge beyond any position means the same)."""
    return max(-(2**62), min(edge, 2**62))


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

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j <= i) & (j % self.stride >= self.stride - self.summary)


def _check_summary(owner: str, stride: int, summary: object) -> None:
    positive_int(owner, "summary", summary)
    if summary > stride:
        raise ValueError(f"{owner}: summary must be at most stride ({stride}), got {summary}")


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Pairs whose block ``(i // block_size, j // block_size)`` is True in ``layout``.

    ``layout`` is a square bool tensor ``[n_blocks, n_blocks]`` (one layout for every head) or
    ``[n_heads, n_blocks, n_blocks]`` (one per query head); blocks are cut at absolute positions
    ``0, block_size, 2 * block_size, ...``. The layout must match the sequence: attention over
    ``n_k`` keys needs ``n_blocks == ceil(n_k / block_size)`` (query positions are absolute, so
    they use the same blocks). Queries at negative positions (``n_q > n_k``) see nothing. Patterns
    are compared by identity, as the layout is a tensor.
    """

    layout: torch.Tensor
    block_size: int
    n_heads: Optional[int] = field(init=False, default=None)

    def __post_init__(self) -> None:
        positive_int("BlockSparse", "block_size", self.block_size)
        layout = self.layout
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"BlockSparse: layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dim() not in (2, 3) or layout.shape[-1] != layout.shape[-2] or layout.numel() == 0:
            raise ValueError(
                "BlockSparse: layout must be a non-empty square [n_blocks, n_blocks] or "
                f"[n_heads, n_blocks, n_blocks] tensor, got shape {tuple(layout.shape)}"
            )
        object.__setattr__(self, "layout", (layout != 0).to("cpu").contiguous())
        object.__setattr__(self, "n_heads", layout.shape[0] if layout.dim() == 3 else None)

    @property
    def n_blocks(self) -> int:
        return self.layout.shape[-1]

    def validate(self, n_q: int, n_k: int) -> None:
        expected = -(-n_k // self.block_size)
        if expected != self.n_blocks:
            raise ValueError(
                f"BlockSparse: layout of shape {tuple(self.layout.shape)} with block_size "
                f"{self.block_size} does not match {n_k} keys (needs {expected} x {expected} blocks)"
            )

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        limit = self.n_blocks * self.block_size
        if (i.numel() and int(i.max()) >= limit) or (j.numel() and int(j.max()) >= limit):
            raise ValueError(
                f"BlockSparse: layout of shape {tuple(self.layout.shape)} with block_size "
                f"{self.block_size} covers positions below {limit}, got position "
                f"{max(int(i.max()), int(j.max()))}"
            )
        layout = self.layout.to(i.device)
        i_block = (i // self.block_size).clamp(min=0)
        j_block = (j // self.block_size).clamp(min=0)
        if self.n_heads is None:
            allowed = layout[i_block, j_block]
        else:
            allowed = layout[:, i_block, j_block]
        return allowed & (i >= 0)


@dataclass(frozen=True)
class Predicate(Pattern):
    """Any rule written as ``fn(i, j) -> BoolTensor`` on broadcasting int64 position tensors.

    This is FlexAttention's ``mask_mod`` idea without the batch and head arguments, e.g.
    ``Predicate(lambda i, j: (j <= i) & (j % 4 == 0))``. ``fn`` must be pure and elementwise.
    Query positions start at ``Nk - Nq``: they are negative when queries outnumber keys.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Predicate: fn must be callable, got {type(self.fn).__name__}")

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        result = self.fn(i, j)
        if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
            raise TypeError(
                f"Predicate: fn must return a bool tensor, got "
                f"{getattr(result, 'dtype', type(result).__name__)}"
            )
        shape = torch.broadcast_shapes(i.shape, j.shape)
        try:
            return result.expand(shape)
        except RuntimeError:
            raise TypeError(
                f"Predicate: fn must return a mask broadcastable to {tuple(shape)}, "
                f"got shape {tuple(result.shape)}"
            ) from None


def _joint_heads(parts: Sequence[Pattern]) -> Optional[int]:
    counts = {p.n_heads for p in parts if p.n_heads is not None}
    if len(counts) > 1:
        raise ValueError(f"cannot combine per-head patterns with different head counts {sorted(counts)}")
    return counts.pop() if counts else None


@dataclass(frozen=True)
class _Combination(Pattern):
    """Two patterns combined pair by pair; per-head parts must agree on the head count."""

    left: Pattern
    right: Pattern
    n_heads: Optional[int] = field(init=False, default=None)

    def __post_init__(self) -> None:
        _check_pattern_args(type(self).__name__, self.left, self.right)
        object.__setattr__(self, "n_heads", _joint_heads([self.left, self.right]))

    def validate(self, n_q: int, n_k: int) -> None:
        self.left.validate(n_q, n_k)
        self.right.validate(n_q, n_k)


@dataclass(frozen=True)
class Union(_Combination):
    """Pairs allowed by either pattern (``a | b``)."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.left.allows(i, j) | self.right.allows(i, j)

    def band(self) -> Optional[Band]:
        a, b = self.left.band(), self.right.band()
        if a is None or b is None or self.n_heads is not None:
            return None
        (a_lo, a_hi), (b_lo, b_hi) = sorted([a, b])
        if b_lo > a_hi + 1:  # a gap between the two bands: not one band
            return None
        return (a_lo, max(a_hi, b_hi))


@dataclass(frozen=True)
class Intersection(_Combination):
    """Pairs allowed by both patterns (``a & b``)."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.left.allows(i, j) & self.right.allows(i, j)

    def band(self) -> Optional[Band]:
        a, b = self.left.band(), self.right.band()
        if a is None or b is None or self.n_heads is not None:
            return None
        return (max(a[0], b[0]), min(a[1], b[1]))


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


def _check_pattern_args(owner: str, *parts: object) -> None:
    for part in parts:
        if not isinstance(part, Pattern):
            raise TypeError(f"{owner}: expected Pattern instances, got {type(part).__name__}")


def as_pattern(pattern: Optional[Pattern]) -> Pattern:
    """``None`` -> :class:`Full`; a :class:`Pattern` is returned as is; anything else is a TypeError."""
    if pattern is None:
        return Full()
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be an attnkit Pattern or None, got {type(pattern).__name__}"
        )
    return pattern
