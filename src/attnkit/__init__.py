"""attnkit: exact, fast self-attention and its efficient variants.

``attention(q, k, v, pattern)`` computes attention restricted to a pattern (Full, Causal,
SlidingWindow, Strided, Fixed, BlockSparse, Predicate, their unions/intersections, PerHead); ``reference_attention`` spells out
the two steps (relevance scores, weighted sum); ``attnkit.nn.MultiHeadAttention`` is the layer;
``attnkit.distributed.ring_attention`` runs attention over a sequence sharded across processes.
"""

from . import distributed, nn
from .functional import BACKENDS, attention, reference_attention
from .kernels.blockwise import merge_lse
from .patterns import (
    BlockLocal,
    BlockSparse,
    Causal,
    Fixed,
    Full,
    Intersection,
    Pattern,
    Periodic,
    PerHead,
    Predicate,
    SlidingWindow,
    Strided,
    Summary,
    Union,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BlockLocal",
    "BlockSparse",
    "Causal",
    "Fixed",
    "Full",
    "Intersection",
    "Pattern",
    "Periodic",
    "PerHead",
    "Predicate",
    "SlidingWindow",
    "Strided",
    "Summary",
    "Union",
    "attention",
    "distributed",
    "merge_lse",
    "nn",
    "reference_attention",
]
