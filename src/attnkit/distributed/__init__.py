"""Sequence parallelism over ``torch.distributed``: exact attention on a sequence sharded across ranks.

Three schemes behind one call shape, each taking this rank's shard of a sequence and returning
this rank's shard of the output, forward and backward: ``ring_attention`` (K/V go round a ring),
``ulysses_attention`` (an all-to-all turns sequence shards into head shards) and
``hybrid_attention`` (Ulysses inside the groups of a ``make_grid`` grid, a ring across them).
``shard``/``unshard``/``assemble`` convert between full tensors and shards, ``shard_positions``
gives a shard's global position ids (for RoPE), the ``*MultiHeadAttention`` layers run an existing
``MultiHeadAttention`` on a sharded sequence (``sequence_parallel`` picks one by name), and
``count_traffic`` counts the bytes every collective sends.
"""

from .comm import DEFAULT_TIMEOUT_S, RingStats, record_ring_stats
from .grid import ParallelGrid, make_grid
from .layers import (
    SCHEMES,
    HybridMultiHeadAttention,
    RingMultiHeadAttention,
    UlyssesMultiHeadAttention,
    sequence_parallel,
)
from .layouts import LAYOUTS, assemble, check_split, shard, shard_positions, unshard
from .ring import ring_attention
from .schedule import RingSchedule, ring_schedule
from .traffic import Traffic, count_traffic
from .ulysses import hybrid_attention, ulysses_attention

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HybridMultiHeadAttention",
    "LAYOUTS",
    "ParallelGrid",
    "RingMultiHeadAttention",
    "RingSchedule",
    "RingStats",
    "SCHEMES",
    "Traffic",
    "UlyssesMultiHeadAttention",
    "assemble",
    "check_split",
    "count_traffic",
    "hybrid_attention",
    "make_grid",
    "record_ring_stats",
    "ring_attention",
    "ring_schedule",
    "sequence_parallel",
    "shard",
    "shard_positions",
    "ulysses_attention",
    "unshard",
]
