"""Ring attention over ``torch.distributed``: sequence-sharded exact attention, forward and backward.

``ring_attention(q, k, v, pattern, layout=...)`` takes this rank's shard of a sequence and returns
this rank's shard of the output; ``shard``/``unshard``/``assemble`` convert between full tensors and
shards, ``shard_positions`` gives a shard's global position ids (for RoPE), and
``RingMultiHeadAttention`` runs an existing ``MultiHeadAttention`` layer on a sharded sequence.
"""

from .comm import DEFAULT_TIMEOUT_S, RingStats
from .layouts import LAYOUTS, assemble, check_split, shard, shard_positions, unshard
from .ring import record_ring_stats, ring_attention
from .schedule import RingSchedule, ring_schedule
from .ring_layer import RingMultiHeadAttention

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "LAYOUTS",
    "RingMultiHeadAttention",
    "RingSchedule",
    "RingStats",
    "assemble",
    "check_split",
    "record_ring_stats",
    "ring_attention",
    "ring_schedule",
    "shard",
    "shard_positions",
    "unshard",
]
