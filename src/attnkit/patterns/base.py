"""The pattern base class, its band helpers, and the pattern algebra (``a | b``, ``a & b``).

Every pattern answers three questions about itself: which pairs it allows (:meth:`Pattern.allows`),
whether its allowed set is a diagonal band (:meth:`Pattern.band`, with :func:`finite_band` for
bands of finite width), and how the sparse planner splits it (:attr:`Pattern.parts`). Union and
Intersection live here because ``|`` and ``&`` on every pattern build them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..checks import positive_int

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

    @property
    def parts(self) -> Optional[tuple["Pattern", ...]]:
        """The pieces the sparse planner computes directly, whose union is this pattern, or None
        when the pattern has no planned decomposition (the planner would fall back to gathering
        tiles, which the blockwise kernel does as well).

        By default a pattern whose band has finite bounds is one piece, ``(self,)``, and any
        other has none; so are the patterns the planner has a geometry for (Periodic, BlockLocal,
        Summary, BlockSparse). :class:`Strided` and :class:`Fixed` give their two parts, a
        :class:`Union` the parts of both sides when both have some. Full, Causal and Predicate
        have none. For per-head patterns the answer is not used: they are planned head by head
        (:func:`~attnkit.patterns.head_runs` first).
        """
        return (self,) if finite_band(self) is not None else None

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


def finite_band(pattern: Pattern) -> Optional[Band]:
    """The pattern's band ``(lo, hi)`` when it has one with finite bounds (the work of the native
    band kernel and of the planner's band geometry), else None."""
    band = pattern.band()
    return band if band is not None and math.isfinite(band[0]) and math.isfinite(band[1]) else None


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

    @property
    def parts(self) -> Optional[tuple[Pattern, ...]]:
        """The parts of both sides, when both have a planned decomposition."""
        left, right = self.left.parts, self.right.parts
        return None if left is None or right is None else left + right

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


def _check_pattern_args(owner: str, *parts: object) -> None:
    for part in parts:
        if not isinstance(part, Pattern):
            raise TypeError(f"{owner}: expected Pattern instances, got {type(part).__name__}")

