"""attnkit: exact, fast self-attention and its efficient variants.

``attention(q, k, v, pattern)`` computes attention restricted to a pattern (Full, Causal,
SlidingWindow, Predicate, their unions/intersections, PerHead); ``reference_attention`` spells out
the two steps (relevance scores, weighted sum); ``attnkit.nn.MultiHeadAttention`` is the layer;
``attnkit.distributed.ring_attention`` runs attention over a sequence sharded across processes.
"""

from . import distributed, nn
from .functional import BACKENDS, attention, reference_attention
from .kernels.blockwise import merge_lse
from .patterns import (
    Causal,
    Full,
    Intersection,
    Pattern,
    PerHead,
    Predicate,
    SlidingWindow,
    Union,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "Causal",
    "Full",
    "Intersection",
    "Pattern",
    "PerHead",
    "Predicate",
    "SlidingWindow",
    "Union",
    "attention",
    "distributed",
    "merge_lse",
    "nn",
    "reference_attention",
]
