"""attnkit: exact, fast self-attention and its efficient variants.

``attention(q, k, v, pattern)`` computes attention restricted to a pattern (Full, Causal,
SlidingWindow, Strided, Fixed, BlockSparse, Predicate, Document, their unions/intersections, PerHead),
its scores optionally modified (``score_mod=softcap(c)``, ``alibi(slopes)``, ``distance_bias(table)``);
``reference_attention`` spells out
the two steps (relevance scores, weighted sum); ``attnkit.nn.MultiHeadAttention`` is the layer;
``attnkit.distributed.ring_attention`` runs attention over a sequence sharded across processes.

The names are imported on first use (``attnkit.attention`` imports the functional layer, and torch
with it), so that ``import attnkit`` is quick and the ``attnkit`` command can check its arguments
before torch loads.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first read.
_EXPORTS = {
    "BACKENDS": "functional",
    "attention": "functional",
    "reference_attention": "functional",
    "merge_lse": "kernels.common",
    **dict.fromkeys(("ScoreMod", "alibi", "distance_bias", "softcap"), "kernels.score_mods"),
    **dict.fromkeys(
        ("BlockLocal", "BlockSparse", "Causal", "Document", "Fixed", "Full", "Intersection", "Pattern", "Periodic", "PerHead",
         "Predicate", "SlidingWindow", "Strided", "Summary", "Union", "document_positions"),
        "patterns",
    ),
}

__all__ = sorted([*_EXPORTS, "distributed", "nn"])

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
