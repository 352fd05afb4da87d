"""The pattern base class, its band helpers, its pieces, and the pattern algebra (``a | b``, ``a & b``).

Every pattern answers four questions about itself: which pairs it allows (:meth:`Pattern.allows`),
whether its allowed set is a diagonal band (:meth:`Pattern.band`, with :func:`finite_band` for
bands of finite width), which disjoint pieces of closed-form geometry it is made of
(:attr:`Pattern.pieces`, each a :class:`Piece`: what every planner runs), and which patterns a
model may give each head and ``auto`` counts as planned (:attr:`Pattern.parts`). Union and
Intersection live here because ``|`` and ``&`` on every pattern build them; :class:`Piece` because
the band patterns and both of them answer their pieces with it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..checks import boolean, positive_int
from .document_bounds import check_bounds, same_document

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
    block_size: Optional[int] = None
    """Set by patterns whose allowed set is made of aligned square blocks of this many positions
    (:class:`~attnkit.patterns.BlockSparse`): a planner that gathers key tiles cuts them on this grid."""

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """BoolTensor: may query position ``i`` see key position ``j``? (broadcasting int64 tensors)"""
        raise NotImplementedError

    def band(self) -> Optional[Band]:
        """``(lo, hi)`` when the allowed set is exactly ``lo <= i - j <= hi``, else None. Per-head
        patterns (``n_heads`` set) have none: their heads may differ."""
        return None

    @property
    def pieces(self) -> Optional[tuple["Piece", ...]]:
        """The pattern as disjoint :class:`Piece` s whose union is exactly its allowed set, or None
        when it has no closed-form geometry (planners then gather blocks of it, evaluating
        :meth:`allows`). Planners read these instead of asking which class a pattern is (the CPU
        planner of ``kernels/sparse_plan.py``; the Triton kernels run the same pieces), so a
        pattern's geometry is declared once, here.

        By default a band is one piece, ``(Piece(lo, hi),)``, and any other pattern has none;
        :class:`Strided`, :class:`Fixed`, their parts and an :class:`Intersection` of one-piece
        patterns declare theirs. Per-head patterns have none: planners run them head by head
        (:func:`~attnkit.patterns.head_runs` first).
        """
        band = self.band()
        return None if band is None else (Piece(*band),)

    @property
    def parts(self) -> Optional[tuple["Pattern", ...]]:
        """The patterns this one is the union of, as a model may give one to each head or layer
        (the paper's arrangements of :class:`Strided` and :class:`Fixed`), or None when ``auto``
        does not count it as the sparse planner's pattern (the planner still runs it, exactly).

        By default a pattern whose band has finite bounds is one part, ``(self,)``, and so is
        one whose pieces are one piece cut into documents (``Causal() & Document(...)``); any
        other has none; so are Periodic, BlockLocal, Summary and BlockSparse. :class:`Strided`
        and :class:`Fixed` give their two parts, a :class:`Union` the parts of both sides when
        both have some. Full, Causal and Predicate have none. For per-head patterns the answer
        is not used: ``auto`` asks it head by head (:func:`~attnkit.patterns.head_runs` first).
        """
        if finite_band(self) is not None:
            return (self,)
        pieces = self.pieces  # documents (alone, or met with a band) are the planner's too
        return (self,) if pieces is not None and len(pieces) == 1 and pieces[0].documents else None

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


def shared_band(pattern: Pattern) -> Optional[Band]:
    """The band ``(lo, hi)`` of every head of ``pattern``, or None: a per-head pattern has none
    (its heads may differ), whatever its ``band()`` says. Ask this, not ``band()``, of a pattern
    that may be per-head."""
    return pattern.band() if pattern.n_heads is None else None


def finite_band(pattern: Pattern) -> Optional[Band]:
    """The pattern's band ``(lo, hi)`` when it has one with finite bounds (the work of the native
    band kernel and of the planner's band geometry), else None."""
    band = shared_band(pattern)
    return band if band is not None and math.isfinite(band[0]) and math.isfinite(band[1]) else None


LATTICE, SUMMARY = "lattice", "summary"
"""The two kinds of keys a :class:`Piece` runs over."""


@dataclass(frozen=True)
class Piece(Pattern):
    """One piece of a pattern's geometry: pairs whose *band coordinates* ``u`` (of the query)
    and ``b`` (of the key) satisfy ``lo <= u - b <= hi`` (either bound may be infinite).

    - ``keys="lattice"``: a query ``i`` and a key ``j`` pair only when ``i % step == j % step``;
      their coordinates are ``u = i // step`` and ``b = j // step``. With ``step=1`` the piece
      is the ordinary band ``lo <= i - j <= hi`` (``SlidingWindow(w)`` is ``Piece(0, w - 1)``);
      ``Piece(0, inf, step=s)`` is :class:`Periodic`.
    - ``keys="summary"``: the keys are the last ``width`` positions of every block of
      ``period`` (:class:`Fixed`'s summary columns), numbered ``b = 0, 1, ...`` in order; a
      query's ``u`` is the number of them it may see minus one: those of earlier blocks and, with
      ``own``, those of its own block up to itself. Queries at negative positions have ``u = -1``.
    - ``segment > 0`` (lattice keys): both positions must also lie in one block of ``segment``
      positions (``BlockLocal(s)`` is ``Piece(0, s - 1, segment=s)``).
    - ``documents`` (lattice keys, non-empty): both positions must also lie in one document, the
      documents being ``[documents[d], documents[d + 1])`` (cumulative bounds, ``cu_seqlens``);
      positions outside ``[0, documents[-1])`` lie in none. ``Document(lengths)`` is
      ``Piece(-inf, inf, documents=bounds)``; ``Causal() & Document(lengths)`` is
      ``Piece(0, inf, documents=bounds)``.

    A piece is a pattern (``allows`` evaluates the formula above), so a planner can mask it
    exactly; the Triton kernels (:mod:`attnkit.kernels.triton_band`) evaluate the same formulas in
    their tiles, reading these fields. A new cut is one more field here (as ``documents`` is),
    met with a band by :meth:`meet`.

    Example: ``Strided(4).pieces == (Piece(0, 4), Piece(2, inf, step=4))``; ``Fixed(4, 1).pieces
    == (Piece(0, 3, segment=4), Piece(0, inf, keys="summary", period=4, width=1))``.
    """

    lo: float
    hi: float
    step: int = 1
    keys: str = LATTICE
    period: int = 1
    width: int = 1
    own: bool = False
    segment: int = 0
    documents: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("lo", "hi"):
            edge = getattr(self, name)
            if isinstance(edge, bool) or not isinstance(edge, numbers.Real) or math.isnan(edge):
                raise TypeError(f"Piece: {name} must be a number or an infinity, got {edge!r}")
        for name in ("step", "period", "width"):
            positive_int("Piece", name, getattr(self, name))
        if self.segment != 0:
            positive_int("Piece", "segment", self.segment)
        boolean("Piece", "own", self.own)
        if self.keys not in (LATTICE, SUMMARY):
            raise ValueError(f"Piece: keys must be {LATTICE!r} or {SUMMARY!r}, got {self.keys!r}")
        if self.width > self.period:
            raise ValueError(f"Piece: width must be at most period ({self.period}), got {self.width}")
        if self.keys == SUMMARY and (self.step != 1 or self.segment or self.documents):
            raise ValueError(
                f"Piece: summary keys take no step, segment or documents, got {self.step}, {self.segment}, "
                f"{len(self.documents)} bounds"
            )
        if self.documents:
            object.__setattr__(self, "documents", check_bounds("Piece", "documents", self.documents))

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if self.keys == SUMMARY:
            return self._summary_allows(i, j)
        if self.step == 1:
            allowed = _band_allows((self.lo, self.hi), i, j)
        else:  # coordinates of index vectors, so the only broadcast result is the boolean one
            same_residue = (i % self.step) == (j % self.step)
            allowed = same_residue & _band_allows((self.lo, self.hi), i // self.step, j // self.step)
        if self.segment:
            allowed = allowed & ((i // self.segment) == (j // self.segment))
        if self.documents:
            allowed = allowed & same_document(self.documents, i, j)
        return allowed

    def _summary_allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        first = self.period - self.width  # offset of the first summary key in a block
        is_summary = (j % self.period) >= first
        b = (j // self.period) * self.width + (j % self.period - first)
        u = (i // self.period) * self.width - 1
        if self.own:
            u = u + (i % self.period - first + 1).clamp(min=0)
        u = torch.where(i >= 0, u, -1)
        return is_summary & _band_allows((self.lo, self.hi), u, b)

    def band(self) -> Optional[Band]:
        plain = self.keys == LATTICE and self.step == 1 and not self.segment and not self.documents
        return (self.lo, self.hi) if plain else None

    @property
    def pieces(self) -> tuple["Piece"]:
        return (self,)

    @property
    def parts(self) -> Optional[tuple["Piece"]]:
        """``(self,)`` unless the piece is a band without finite bounds (as Causal, Full)."""
        band = self.band()
        return None if band is not None and finite_band(self) is None else (self,)

    def meet(self, other: "Piece") -> Optional["Piece"]:
        """The pairs both pieces allow, as one piece, or None when that is not one piece: lattice
        pieces of one step meet in the overlap of their bounds, cut by the segment and the
        documents of either (when both cut, only at the same segment, the same documents)."""
        if self.keys != LATTICE or other.keys != LATTICE or self.step != other.step:
            return None
        if self.segment and other.segment and self.segment != other.segment:
            return None
        if self.documents and other.documents and self.documents != other.documents:
            return None
        return Piece(
            max(self.lo, other.lo), min(self.hi, other.hi), self.step,
            segment=self.segment or other.segment, documents=self.documents or other.documents,
        )


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

    @property
    def pieces(self) -> Optional[tuple[Piece, ...]]:
        """The meet of the two sides' pieces when each side is one piece and they meet in one
        (two bands; ``BlockLocal(s) & SlidingWindow(w)``), else None."""
        left, right = self.left.pieces, self.right.pieces
        if left is None or right is None or len(left) != 1 or len(right) != 1:
            return None
        met = left[0].meet(right[0])
        return None if met is None else (met,)


def _check_pattern_args(owner: str, *parts: object) -> None:
    for part in parts:
        if not isinstance(part, Pattern):
            raise TypeError(f"{owner}: expected Pattern instances, got {type(part).__name__}")

