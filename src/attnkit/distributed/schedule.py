"""Which ring steps are worth doing: the schedule every rank derives alone, with no communication.

At step ``t`` rank ``r`` holds the keys/values of rank ``(r - t) mod P``. A step is *needed* by a
rank when the pattern allows at least one pair between its queries and that KV shard, at their
true global positions. The ring runs ``steps`` steps, one past the last step any rank needs: with
a causal sliding window over contiguous shards that is ``ceil(window / shard) + 1`` at most
(often fewer), not ``P``; steps beyond it cost neither compute nor transfer.

Band patterns (Full, Causal, SlidingWindow, their intersections) are decided exactly with a binary
search over sorted positions, and so are bands cut into documents (``Causal() & Document(...)``:
each query's keys are its band clipped to its document, whatever the documents' lengths). Other
patterns are taken as needing every step; the blockwise kernel then skips their empty tiles inside
a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.sparse_plan import document_piece
from ..patterns import Band, Pattern, Piece, shared_band
from .layouts import shard_positions


@dataclass(frozen=True)
class RingSchedule:
    """``steps`` ring steps for all ranks; ``needed[r][t]``: rank ``r`` computes at step ``t``."""

    steps: int
    needed: tuple[tuple[bool, ...], ...]

    def compute_steps(self, rank: int) -> int:
        """How many of the steps rank ``rank`` computes (the others it only forwards)."""
        return sum(self.needed[rank])


def _band_meets(band: Band, q_pos: torch.Tensor, k_sorted: torch.Tensor) -> bool:
    """Does some query in ``q_pos`` allow some key in ``k_sorted`` (``lo <= i - j <= hi``)?"""
    lo, hi = band
    # Allowed keys of query i are the j with i - hi <= j <= i - lo.
    first = q_pos - int(hi) if math.isfinite(hi) else torch.full_like(q_pos, -1)
    last = q_pos - int(lo) if math.isfinite(lo) else torch.full_like(q_pos, int(k_sorted[-1]) + 1)
    hits = torch.searchsorted(k_sorted, last, right=True) - torch.searchsorted(k_sorted, first)
    return bool((hits > 0).any())


def _document_meets(piece: Piece, q_pos: torch.Tensor, k_sorted: torch.Tensor) -> bool:
    """Does some query in ``q_pos`` see some key in ``k_sorted`` under a band cut into documents?"""
    bounds = torch.tensor(piece.documents)
    q_pos = q_pos[(q_pos >= 0) & (q_pos < bounds[-1])]  # positions outside every document see nothing
    document = torch.searchsorted(bounds[1:], q_pos, right=True)
    first, last = bounds[document], bounds[document + 1] - 1  # the query's document
    if math.isfinite(piece.hi):
        first = torch.maximum(first, q_pos - int(piece.hi))
    if math.isfinite(piece.lo):
        last = torch.minimum(last, q_pos - int(piece.lo))
    hits = torch.searchsorted(k_sorted, last, right=True) - torch.searchsorted(k_sorted, first)
    return bool((hits > 0).any())


def ring_schedule(pattern: Pattern, layout: str, seq_len: int, world_size: int) -> RingSchedule:
    """The schedule of a ring over ``world_size`` ranks holding ``seq_len`` tokens in ``layout``."""
    return schedule_for(pattern, [shard_positions(seq_len, layout, r, world_size) for r in range(world_size)])


def schedule_for(pattern: Pattern, positions: list[torch.Tensor]) -> RingSchedule:
    """The schedule of a ring whose rank ``r`` holds the tokens at ``positions[r]`` (sorted)."""
    world_size = len(positions)
    band = shared_band(pattern)
    documents = document_piece(pattern) if pattern.n_heads is None else None
    positions = [p.cpu() for p in positions]
    needed = []
    for rank in range(world_size):
        row = []
        for step in range(world_size):
            source = (rank - step) % world_size
            if documents is not None:
                row.append(_document_meets(documents, positions[rank], positions[source]))
            else:
                row.append(band is None or _band_meets(band, positions[rank], positions[source]))
        needed.append(row)
    last = max((t for row in needed for t, need in enumerate(row) if need), default=0)
    return RingSchedule(last + 1, tuple(tuple(row[: last + 1]) for row in needed))
