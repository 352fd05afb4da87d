"""The sparse planner: turn a pattern into disjoint parts of equally shaped attention *units*.

A plan is a list of *parts*, exact sub-attentions over disjoint key sets whose results are merged
by their log-sum-exp. The parts are the pattern's own pieces (see
:attr:`~attnkit.patterns.Pattern.pieces`: ``Strided`` and ``Fixed`` declare two, a band one); a
union without pieces of its own gives the pieces of each side, also when only one side has some;
any other pattern is one part. Each part keeps only the pairs that no earlier part allows, so no
key is counted twice. Each part is a few groups of units: a unit is ``R`` query positions that see
the same ``C`` key positions, and a group runs as one batched attention call. The geometry of a
unit follows the kind of the piece (:class:`~attnkit.patterns.Piece`):

- a band with finite bounds (``SlidingWindow`` and compositions with a finite band): units are
  blocks of ``BAND_ROWS`` consecutive queries; each sees the ``BAND_ROWS + hi - lo`` keys its band
  reaches. Blocks at the two ends of the sequence form groups of their own, so the interior group
  shares one ``R x C`` element mask;
- residues modulo a ``step`` (``Periodic``, Strided's periodic keys): the positions of one residue
  form one unit, an independent sequence of ``n / step`` positions;
- blocks of ``segment`` positions (``BlockLocal``, Fixed's blocks): one unit per block, unless
  the piece's band is narrower than its blocks (then the band's units);
- summary keys (Fixed's summary columns, seen up to the query): blocks of queries see the prefix
  of the summary columns that lies before them; blocks are bucketed by prefix length so the
  padding stays small;
- anything else (bands without finite bounds such as ``Causal``, ``BlockSparse``, ``Predicate``,
  intersections without pieces, summary keys seen ahead of the query): blocks of queries gather
  the key tiles where the pattern allows at least one pair, bucketed by tile count; tiles follow
  the pattern's ``block_size`` when it has one.

Each unit carries an exact element mask evaluated once from the part's predicate; plans are cached
per (pattern, sizes, device). Nothing here is ``Nq x Nk``: positions, masks and the work that
follows are proportional to the pairs the units cover.

A pattern that is one piece cut into documents (``Document``, ``Causal() & Document(...)``,
``SlidingWindow(w) & Document(...)``: :func:`document_piece`) gets a plan of its own,
:func:`plan_documents`: each document with queries is one unit of its own size, the piece's band
clamped to the document, and documents of equal sizes form one group. Nothing is evaluated
element by element (a document's band needs no mask), so the plan costs a few operations per
document, and the work that follows is each document's band, nothing across documents.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..patterns import LATTICE, SUMMARY, Difference, Pattern, Piece, Union, finite_band

UNIT_ROWS = 128
"""Query rows per unit of the summary and tile geometries."""
BAND_ROWS = 32
"""Query rows per unit of the band geometry in the forward pass: small blocks waste few keys at the
band's edges (``(R + hi - lo) / (hi - lo + 1)`` computed per allowed); 32 measured fastest for
windows of 128-256."""
BACKWARD_BAND_ROWS = 128
"""The same for the backward pass, where each unit's key gradients ``(C, D)`` are written out
before they are summed: fewer, larger units write less."""
_MASK_CHUNK = 1 << 22  # predicate evaluations at once while planning
_BUCKET_FILL = 0.8  # a bucket of units keeps at least this share of its widest unit's keys


@dataclass(frozen=True, eq=False)
class UnitGroup:
    """``U`` units of one shape, in absolute positions.

    ``q_pos (U, R)``: the query positions of each unit (those outside the queries are padding);
    ``k_pos (U, C)``: the key positions (those outside ``[0, n_k)`` are padding);
    ``blocked (U or 1, R, C)``: pairs to leave out (padding included), one shared mask when every
    unit has the same; ``seen (U, R)``: rows with at least one allowed key in this group.
    ``cache`` holds the additive masks built from ``blocked`` per dtype and GQA group size.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    blocked: torch.Tensor
    seen: torch.Tensor
    cache: dict = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        """Score entries this group computes per query head and batch."""
        return self.q_pos.numel() * self.k_pos.shape[1]


@dataclass(frozen=True, eq=False)
class SparsePlan:
    """Disjoint parts, each a tuple of groups whose query rows do not overlap."""

    n_q: int
    n_k: int
    parts: tuple[tuple[UnitGroup, ...], ...]
    bands: tuple[Optional[tuple[float, float]], ...] = ()
    """Per part, its finite band when the part is exactly one (then the native band kernel may run
    it instead of its units), else None."""

    @property
    def offset(self) -> int:
        """Absolute position of query row 0 (bottom-right alignment)."""
        return self.n_k - self.n_q

    @property
    def computed_pairs(self) -> int:
        """Score entries the plan computes per query head and batch."""
        return sum(g.pairs for part in self.parts for g in part)


def _block_units(offset: int, n_q: int, size: int) -> tuple[int, int]:
    """First absolute position and count of ``size``-aligned blocks covering the query positions."""
    first = (offset // size) * size
    return first, -(-(offset + n_q - first) // size)


def _query_blocks(offset: int, n_q: int, size: int) -> torch.Tensor:
    first, count = _block_units(offset, n_q, size)
    return first + torch.arange(count * size).view(count, size)


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of equal consecutive values of a 1-D tensor."""
    change = (flags[1:] != flags[:-1]).nonzero().flatten() + 1
    bounds = [0, *change.tolist(), len(flags)]
    return list(zip(bounds[:-1], bounds[1:]))


def _band_geometry(lo: int, hi: int, offset: int, n_q: int, n_k: int, rows: int) -> list[tuple]:
    # A band wider than the problem allows no more pairs than the problem's own span of i - j
    # (a window of 10**9 over 8 tokens): plan that span, not the band's width.
    lo, hi = max(lo, min(hi, offset - n_k + 1)), min(hi, max(lo, offset + n_q - 1))
    q_pos = _query_blocks(offset, n_q, rows)
    k_pos = (q_pos[:, :1] - hi) + torch.arange(rows + hi - lo)
    interior = ((q_pos >= offset) & (q_pos < offset + n_q)).all(1) & (k_pos[:, 0] >= 0) & (k_pos[:, -1] < n_k)
    return [(q_pos[a:b], k_pos[a:b]) for a, b in _runs(interior)]


def _periodic_geometry(stride: int, offset: int, n_q: int, n_k: int) -> list[tuple]:
    q_pos = _query_blocks(offset, n_q, stride).T  # (stride, count): one residue per unit
    k_pos = _query_blocks(0, n_k, stride).T
    return [(q_pos, k_pos)]


def _block_local_geometry(stride: int, offset: int, n_q: int, n_k: int) -> list[tuple]:
    q_pos = _query_blocks(offset, n_q, stride)
    return [(q_pos, q_pos)]


def _bucketed(q_pos: torch.Tensor, k_pos: torch.Tensor, need: torch.Tensor) -> list[tuple]:
    """Split units whose keys are left-aligned in ``k_pos (U, Cmax)``, unit ``u`` needing the first
    ``need[u]``, into groups of similar width (each keeps >= ``_BUCKET_FILL`` of its widest)."""
    order = torch.argsort(need, descending=True, stable=True)
    need_sorted = need[order].tolist()
    groups, start = [], 0
    while start < len(order) and need_sorted[start] > 0:
        width, stop = need_sorted[start], start
        while stop < len(order) and need_sorted[stop] >= max(_BUCKET_FILL * width, 1):
            stop += 1
        members = order[start:stop].sort().values
        groups.append((q_pos[members], k_pos[members, :width]))
        start = stop
    return groups


def _summary_geometry(stride: int, summary: int, offset: int, n_q: int, n_k: int, rows: int) -> list[tuple]:
    q_pos = _query_blocks(offset, n_q, rows)
    keys = torch.arange(n_k)
    keys = keys[keys % stride >= stride - summary]
    need = torch.searchsorted(keys, q_pos[:, -1].contiguous(), right=True)  # summary keys up to the unit
    return _bucketed(q_pos, keys.expand(len(q_pos), -1), need)


def _tile_geometry(pattern: Pattern, offset: int, n_q: int, n_k: int, rows: int, tile: int) -> list[tuple]:
    """Query blocks of ``rows`` gather the key tiles of ``tile`` keys where ``pattern`` allows a
    pair (found by evaluating the predicate one query block at a time: ``rows x n_k`` at most)."""
    q_pos = _query_blocks(offset, n_q, rows)
    n_tiles = -(-n_k // tile)
    k_all = torch.arange(n_tiles * tile)
    k_safe = k_all.clamp(max=n_k - 1)
    nonempty = torch.zeros(len(q_pos), n_tiles, dtype=torch.bool)
    for u, unit in enumerate(q_pos):
        rows = unit[(unit >= offset) & (unit < offset + n_q)]
        if len(rows):
            allowed = pattern.allows(rows[:, None], k_safe[None, :]) & (k_all < n_k)
            nonempty[u] = allowed.view(len(rows), n_tiles, tile).any(-1).any(0)
    tiles = torch.argsort((~nonempty).to(torch.int8), dim=1, stable=True)  # non-empty tiles first
    k_pos = (tiles[:, :, None] * tile + torch.arange(tile)).flatten(1)
    return _bucketed(q_pos, k_pos, nonempty.sum(1) * tile)


def _piece_geometry(piece: Piece, offset: int, n_q: int, n_k: int, rows: int, band_rows: int) -> Optional[list]:
    """The units of a piece by its kind, or None where tiles serve (a band without finite bounds,
    summary keys a query may see ahead of itself)."""
    if piece.keys == SUMMARY:
        if piece.lo < 0:  # the summary units hold the keys up to their last query only
            return None
        return _summary_geometry(piece.period, piece.width, offset, n_q, n_k, rows)
    if piece.step > 1:
        return _periodic_geometry(piece.step, offset, n_q, n_k)
    bounded = math.isfinite(piece.lo) and math.isfinite(piece.hi)
    if bounded and piece.lo > piece.hi:  # an empty band: no units
        return []
    if piece.segment and not (bounded and piece.hi - piece.lo + 1 < piece.segment):
        return _block_local_geometry(piece.segment, offset, n_q, n_k)
    if bounded:
        return _band_geometry(int(piece.lo), int(piece.hi), offset, n_q, n_k, band_rows)
    return None


def _geometry(part: Pattern, offset: int, n_q: int, n_k: int, rows: int, band_rows: int) -> list[tuple]:
    """Units ``(q_pos (U, R), k_pos (U, C))`` in absolute positions covering every allowed pair."""
    units = _piece_geometry(part, offset, n_q, n_k, rows, band_rows) if isinstance(part, Piece) else None
    if units is not None:
        return units
    return _tile_geometry(part, offset, n_q, n_k, rows, part.block_size or rows)


def split_parts(pattern: Pattern) -> list[Pattern]:
    """The parts the planner gives a geometry of their own; their union is ``pattern``. The
    pattern's :attr:`~attnkit.patterns.Pattern.pieces` when it has them; a union without pieces
    (``Predicate | Strided``) is split by its sides, so the side with pieces keeps their
    geometry; else the pattern itself (gathered by tiles)."""
    if pattern.pieces is not None:
        return list(pattern.pieces)
    if isinstance(pattern, Union):
        return split_parts(pattern.left) + split_parts(pattern.right)
    return [pattern]


def _unit_group(q_pos, k_pos, exact: Pattern, offset: int, n_q: int, n_k: int) -> Optional[UnitGroup]:
    """Evaluate the exact mask of the units; drop units and edge columns with no allowed pair."""
    q_real = (q_pos >= offset) & (q_pos < offset + n_q)
    k_real = (k_pos >= 0) & (k_pos < n_k)
    q_safe = q_pos.clamp(offset, offset + n_q - 1)  # padding: any in-range position, masked below
    k_safe = k_pos.clamp(0, n_k - 1)
    step = max(1, _MASK_CHUNK // (q_pos.shape[1] * k_pos.shape[1]))
    allowed = torch.cat([
        exact.allows(q_safe[u : u + step, :, None], k_safe[u : u + step, None, :])
        for u in range(0, len(q_pos), step)
    ])
    allowed &= q_real[:, :, None] & k_real[:, None, :]
    keep = allowed.flatten(1).any(1)
    if not bool(keep.any()):
        return None
    q_pos, k_pos, allowed = q_pos[keep], k_pos[keep], allowed[keep]
    used = allowed.any(1).any(0).nonzero().flatten()
    cols = slice(int(used[0]), int(used[-1]) + 1)
    k_pos, allowed = k_pos[:, cols], allowed[:, :, cols]
    shared = bool((allowed == allowed[:1]).all())
    blocked = ~(allowed[:1] if shared else allowed)
    return UnitGroup(q_pos, k_pos, blocked, allowed.any(-1))


@functools.lru_cache(maxsize=16)
def plan_sparse(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    device: torch.device,
    unit_rows: int = UNIT_ROWS,
    band_rows: int = BAND_ROWS,
) -> SparsePlan:
    """The plan of one pattern without a head dimension for an ``n_q x n_k`` problem, cached.
    ``unit_rows`` is the query block of the summary and tile geometries, ``band_rows`` that of
    the band geometry. Any plan of a pattern computes the same function, so the backward pass
    may use other unit sizes than the forward pass.

    Part ``p`` keeps only the pairs that no earlier part allows. A pattern that allows nothing
    gets one fully masked unit, so the result stays differentiable (zero gradients).
    """
    offset = n_k - n_q
    parts, bands, earlier = [], [], None
    for piece in split_parts(pattern):
        exact = piece if earlier is None else Difference(piece, earlier)
        groups = []
        for q_pos, k_pos in _geometry(piece, offset, n_q, n_k, unit_rows, band_rows):
            group = _unit_group(q_pos, k_pos, exact, offset, n_q, n_k)
            if group is not None:
                groups.append(group)
        if groups:
            parts.append(tuple(groups))
            bands.append(finite_band(exact))  # a Difference has no band: only pure bands qualify
        earlier = piece if earlier is None else Union(earlier, piece)
    if not parts:
        one = torch.full((1, 1), offset, dtype=torch.long)
        nothing_seen = torch.zeros(1, 1, dtype=torch.bool)
        parts.append((UnitGroup(one, one * 0, torch.ones(1, 1, 1, dtype=torch.bool), nothing_seen),))
    moved = tuple(
        tuple(UnitGroup(*(t.to(device) for t in (g.q_pos, g.k_pos, g.blocked, g.seen))) for g in part)
        for part in parts
    )
    return SparsePlan(n_q, n_k, moved, tuple(bands) + (None,) * (len(moved) - len(bands)))


# ---------------------------------------------------------------------------------------------
# Documents: one unit per document, each the piece's band inside it.


@dataclass(frozen=True, eq=False)
class DocumentGroup:
    """Documents of one size: unit ``u`` is query rows ``q_starts[u] : q_starts[u] + n_q`` and
    keys ``k_starts[u] : k_starts[u] + n_k``, bottom-right aligned inside the unit (its queries
    are the document's last ``n_q`` positions), allowed pairs ``band[0] <= i - j <= band[1]``
    in the unit's own positions (finite: the piece's band clamped to the unit).
    ``cache`` holds the index tensors built from the starts per device."""

    q_starts: tuple[int, ...]
    k_starts: tuple[int, ...]
    n_q: int
    n_k: int
    band: tuple[int, int]
    cache: dict = field(default_factory=dict)

    @property
    def pairs(self) -> int:
        """Allowed pairs of all units (what a band kernel computes, give or take its blocks)."""
        lo, hi = self.band
        rows = torch.arange(self.n_k - self.n_q, self.n_k)
        per_row = ((rows - lo).clamp(max=self.n_k - 1) - (rows - hi).clamp(min=0) + 1).clamp(min=0)
        return len(self.q_starts) * int(per_row.sum())

    def causal(self) -> bool:
        """Whether each unit is plain causal attention (square, every earlier key)."""
        return self.n_q == self.n_k and self.band == (0, self.n_k - 1)

    def full(self) -> bool:
        """Whether each unit is full attention."""
        return self.band == (1 - self.n_q, self.n_k - 1)


@dataclass(frozen=True, eq=False)
class DocumentPlan:
    """The documents of an ``n_q x n_k`` problem that hold queries and allowed pairs, by size."""

    n_q: int
    n_k: int
    groups: tuple[DocumentGroup, ...]

    @property
    def computed_pairs(self) -> int:
        """Score entries the plan computes per query head and batch."""
        return sum(g.pairs for g in self.groups)


def document_piece(pattern: Pattern) -> Optional[Piece]:
    """The pattern's one piece when it is a band cut into documents (what :func:`plan_documents`
    plans), else None."""
    pieces = pattern.pieces
    if pieces is None or len(pieces) != 1:
        return None
    piece = pieces[0]
    plain = piece.keys == LATTICE and piece.step == 1 and not piece.segment
    return piece if plain and piece.documents else None


def plan_documents(piece: Piece, n_q: int, n_k: int, *, cached: bool = True) -> DocumentPlan:
    """The plan of a :func:`document_piece` for an ``n_q x n_k`` problem, cached unless
    ``cached=False`` (what a new batch of lengths costs: the benchmark's measure). The piece's
    documents must cover the ``n_k`` keys (``Document.validate``). Per document ``[s, e)``: keys
    ``s .. e - 1``, queries the positions ``max(s, n_k - n_q) .. e - 1``; documents without
    queries or without allowed pairs are left out (rows of the latter give zeros and -inf)."""
    make = _plan_documents if cached else _plan_documents.__wrapped__
    return make(piece.documents, piece.lo, piece.hi, n_q, n_k)


@functools.lru_cache(maxsize=16)
def _plan_documents(bounds: tuple[int, ...], lo: float, hi: float, n_q: int, n_k: int) -> DocumentPlan:
    offset = n_k - n_q
    starts, ends = np.asarray(bounds[:-1], dtype=np.int64), np.asarray(bounds[1:], dtype=np.int64)
    q_first = np.maximum(starts, offset)
    sizes_q, sizes_k = ends - q_first, ends - starts
    keep = sizes_q > 0
    starts, q_first, sizes_q, sizes_k = starts[keep], q_first[keep] - offset, sizes_q[keep], sizes_k[keep]
    shapes, which = np.unique(np.stack([sizes_q, sizes_k], 1), axis=0, return_inverse=True)
    groups = []
    for g, (size_q, size_k) in enumerate(shapes.tolist()):
        # i - j inside a unit spans [1 - size_q, size_k - 1]: clamping keeps the band's pairs.
        band = (int(max(lo, 1 - size_q)), int(min(hi, size_k - 1)))
        if band[0] > band[1]:
            continue
        members = which.reshape(-1) == g
        groups.append(DocumentGroup(
            tuple(q_first[members].tolist()), tuple(starts[members].tolist()), size_q, size_k, band
        ))
    return DocumentPlan(n_q, n_k, tuple(groups))


__all__ = [
    "BACKWARD_BAND_ROWS", "BAND_ROWS", "DocumentGroup", "DocumentPlan", "SparsePlan", "UNIT_ROWS", "UnitGroup",
    "document_piece", "plan_documents", "plan_sparse", "split_parts",
]
