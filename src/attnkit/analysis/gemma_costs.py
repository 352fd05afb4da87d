"""What a Gemma 3 configuration's KV cache costs: window layers keep ``sliding_window`` positions,
global layers the whole context, beside an all-global model of the same shape.

A window layer attends to at most ``sliding_window`` keys, so its cache (a rolling one, see
:meth:`attnkit.models.gemma3.Gemma3.make_caches`) holds ``min(context, sliding_window)``
positions whatever the context; a global layer holds ``context``. The bytes here are the ones
``make_caches`` allocates (a test checks it).
"""

from __future__ import annotations

from dataclasses import replace

from ..checks import positive_int
from ..models.gemma3 import Gemma3Config, parameter_shapes
from ..models.gemma3.config import FULL, SLIDING
from .llama_costs import CONTEXTS, DTYPE_BYTES


def all_global(config: Gemma3Config) -> Gemma3Config:
    """The same model with every layer global (full causal attention)."""
    return replace(config, layer_types=(FULL,) * config.n_layers)


def kv_cache_bytes(config: Gemma3Config, context: int, dtype_bytes: int, batch: int = 1) -> int:
    """Bytes of keys and values cached for ``batch`` rows of ``context`` tokens, all layers."""
    positions = sum(context if window is None else min(context, window) for window in config.layer_windows)
    return 2 * batch * positions * config.n_kv_heads * config.head_dim * dtype_bytes


def kv_rows(config: Gemma3Config, contexts=CONTEXTS, *, dtype: str = "bf16", batch: int = 1) -> list[dict]:
    """Per context: KV bytes of the layer mix (``mixed``), of the all-global model, and their ratio."""
    size = DTYPE_BYTES[dtype]
    rows = []
    for context in contexts:
        mixed = kv_cache_bytes(config, context, size, batch)
        full = kv_cache_bytes(all_global(config), context, size, batch)
        rows.append({"context": context, "mixed": mixed, "all_global": full, "ratio": full / mixed})
    return rows


def report(config: Gemma3Config, *, context: int = 8192, batch: int = 1, contexts=CONTEXTS) -> dict:
    """Parameters, the layer mix, and KV-cache bytes (layer mix vs all-global) at ``context`` and
    across those ``contexts`` the model was trained for (``max_position_embeddings``), per dtype.
    Raises ValueError for a non-positive context or batch."""
    positive_int("gemma_costs", "context", context)
    positive_int("gemma_costs", "batch", batch)
    return {
        "parameters": sum(shape.numel() for shape in parameter_shapes(config).values()),
        "layers": {"window": config.layer_types.count(SLIDING), "global": config.layer_types.count(FULL),
                   "sliding_window": config.sliding_window},
        "context": context,
        "batch": batch,
        "kv_cache": {dtype: kv_rows(config, (context,), dtype=dtype, batch=batch)[0] for dtype in DTYPE_BYTES},
        "kv_by_context": kv_rows(config, sorted({*(n for n in contexts if n <= config.max_position_embeddings),
                                                 context}), batch=batch),
    }
