"""Bytes each rank sends per attention call (forward + backward), for each scheme: the cost model.

With ``N`` tokens on ``P`` ranks (``n = N / P`` per rank), batch ``B``, ``Hq`` query and ``Hkv``
KV heads of width ``D`` (values ``Dv``), ``b`` bytes per element and ``a`` per accumulator
(float32 for half inputs, else ``b``):

- **Ring**, ``S`` steps (``P``, fewer when a window lets the schedule skip): the forward sends
  the K/V shard ``S - 1`` times, the backward sends it ``S - 1`` times more and its dK/dV
  accumulator ``S - 1`` times plus once home: ``B Hkv n (D + Dv) (2 b (S - 1) + a S)`` (nothing
  for ``S = 1``). Per rank this does not shrink with ``P``: ``~ B Hkv N (D + Dv) (2 b + a)``.
- **Ulysses**, rank ``s`` of ``U`` computing ``h_s`` query and ``g_s`` KV heads (see
  :mod:`.heads`): the forward sends every other rank its heads of q, k, v (``(Hq - h_s) D +
  (sum of the others' g_t) (D + Dv)`` elements per token) and the output of its own heads for the
  others' tokens (``h_s (U - 1) Dv``); the backward mirrors it (the output gradient to heads, dQ,
  dK, dV back). With even heads this is ``4 (U - 1) / U * B n (Hq + Hkv) D b`` for ``D = Dv``:
  per rank it shrinks as ``1 / P``. ``return_lse`` adds the LSE (and its gradient) in ``a``.
- **Hybrid** ``U x R``: Ulysses inside each group of ``U`` (shards of ``n``), then a ring of ``R``
  steps over ``N / R`` tokens of the ``g_s`` KV heads of this rank.

Every call also sends :data:`~.agreement.ROW_INTS` int64 to each peer of each agreement stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..patterns import Pattern
from .agreement import ROW_INTS
from .heads import split_heads
from .ring import ring_positions
from .schedule import schedule_for


@dataclass(frozen=True)
class CallShape:
    """The full problem of one call: ``seq`` tokens in all, element size ``itemsize`` in bytes."""

    batch: int
    seq: int
    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    itemsize: int

    @property
    def acc_itemsize(self) -> int:
        """Bytes of an accumulator or LSE element (float32 for half inputs)."""
        return 4 if self.itemsize == 2 else self.itemsize


def ring_bytes(shape: CallShape, ring_degree: int, kv_heads: Optional[int] = None, steps: Optional[int] = None) -> int:
    """Bytes one rank of a ring of ``ring_degree`` sends per call, holding ``seq / ring_degree``
    tokens of ``kv_heads`` KV heads (default all), over ``steps`` steps (default the degree)."""
    steps = ring_degree if steps is None else steps
    if steps <= 1:
        return 0
    kv_heads = shape.kv_heads if kv_heads is None else kv_heads
    kv = shape.batch * kv_heads * (shape.seq // ring_degree) * (shape.head_dim + shape.value_dim)
    return kv * (2 * shape.itemsize * (steps - 1) + shape.acc_itemsize * steps)


def ulysses_bytes(shape: CallShape, degree: int, rank: int, world: int, return_lse: bool = False) -> int:
    """Bytes Ulysses rank ``rank`` of a group of ``degree`` sends per call, each rank of the
    ``world`` holding ``seq / world`` tokens. ``return_lse``: the LSE is returned and its gradient
    used."""
    if degree == 1:
        return 0
    split = split_heads(shape.q_heads, shape.kv_heads, degree)
    heads = [stop - start for start, stop in split.q]
    kv_heads = [stop - start for start, stop in split.kv]
    mine, others_q, others_kv = heads[rank], sum(heads) - heads[rank], sum(kv_heads) - kv_heads[rank]
    d, dv, b = shape.head_dim, shape.value_dim, shape.itemsize
    forward = others_q * d + others_kv * (d + dv) + mine * (degree - 1) * dv
    backward = others_q * dv + mine * (degree - 1) * d + kv_heads[rank] * (degree - 1) * (d + dv)
    elements = shape.batch * (shape.seq // world)
    lse = (mine * (degree - 1) + others_q) * shape.acc_itemsize if return_lse else 0
    return elements * ((forward + backward) * b + lse)


def scheme_bytes(
    scheme: str, shape: CallShape, world: int, *, ulysses_degree: Optional[int] = None, rank: int = 0,
    return_lse: bool = False, ring_steps: Optional[int] = None,
) -> int:
    """Bytes rank ``rank`` (of the scheme's group, or of the grid) sends per call of ``scheme``
    (``"ring"``, ``"ulysses"``, ``"hybrid"`` with ``ulysses_degree``) over ``world`` ranks,
    including the agreement check; ``ring_steps`` for a ring whose schedule skips steps."""
    stage = ROW_INTS * 8
    if scheme == "ring":
        return ring_bytes(shape, world, steps=ring_steps) + stage * (world - 1)
    if scheme == "ulysses":
        return ulysses_bytes(shape, world, rank, world, return_lse) + stage * (world - 1)
    if scheme != "hybrid" or ulysses_degree is None or world % ulysses_degree:
        raise ValueError(f"scheme must be ring, ulysses or hybrid with a ulysses_degree dividing {world}")
    ring_degree, u = world // ulysses_degree, rank % ulysses_degree
    split = split_heads(shape.q_heads, shape.kv_heads, ulysses_degree)
    kv_heads = split.kv[u][1] - split.kv[u][0]
    return (
        ulysses_bytes(shape, ulysses_degree, u, world, return_lse)
        + ring_bytes(shape, ring_degree, kv_heads, ring_steps)
        + stage * (ulysses_degree - 1 + ring_degree - 1)
    )


def ring_steps(pattern: Pattern, layout: str, seq_len: int, world: int, ulysses_degree: int = 1) -> int:
    """Steps the ring of a scheme runs for ``pattern`` (its schedule): the ring's over ``world``
    ranks for ``ulysses_degree`` 1, the hybrid's over ``world / ulysses_degree`` Ulysses groups,
    none for Ulysses alone (``ulysses_degree == world``)."""
    if ulysses_degree == world:
        return 0
    return schedule_for(pattern, ring_positions(seq_len, layout, ulysses_degree, world)).steps


__all__ = ["CallShape", "ring_bytes", "ring_steps", "scheme_bytes", "ulysses_bytes"]
