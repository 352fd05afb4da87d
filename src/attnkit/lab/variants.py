"""The attention variants the lab compares, as Llama configurations that differ only in attention.

Every variant shares the width, depth, query heads, head size, SwiGLU width, vocabulary and RoPE of
one base :class:`~attnkit.models.llama.LlamaConfig`; a variant changes only ``n_kv_heads``
(MHA / GQA / MQA) or ``layer_patterns`` (sparse patterns, a per-layer mix). Fewer key/value heads
are **not compensated**: GQA and MQA models simply have fewer parameters (their K/V projections
shrink), and the report shows the count next to the quality.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..analysis.llama_costs import kv_bytes_per_token, parameters
from ..models.llama import LlamaConfig
from ..patterns import Causal, Fixed, Pattern, SlidingWindow, Strided, shared_band


@dataclass(frozen=True)
class Variant:
    """A named attention choice: ``n_kv_heads`` (None = as many as query heads) and one pattern
    per layer (None = causal)."""

    name: str
    n_kv_heads: Optional[int]
    layer_patterns: Optional[tuple[Optional[Pattern], ...]] = None

    def config(self, base: LlamaConfig) -> LlamaConfig:
        """``base`` with this variant's attention; every other field is kept."""
        kv = base.n_heads if self.n_kv_heads is None else self.n_kv_heads
        return replace(base, n_kv_heads=kv, layer_patterns=self.layer_patterns)


def standard_variants(n_layers: int, n_heads: int, *, window: int, stride: int, summary: int) -> list[Variant]:
    """MHA, GQA with 4 and 2 KV heads, MQA, SlidingWindow(window), Strided(stride),
    Fixed(stride, summary) and a mix: windows on every layer but the last, which is causal (full).

    GQA entries whose KV-head count does not divide ``n_heads`` (or equals it) are left out.
    Sparse variants keep all heads (MHA) so they differ from MHA only in their pattern.
    """
    if n_layers < 2:
        raise ValueError(f"lab: the per-layer mix needs at least 2 layers, got n_layers={n_layers}")
    variants = [Variant("MHA", None)]
    variants += [Variant(f"GQA-{kv}", kv) for kv in (4, 2) if kv < n_heads and n_heads % kv == 0]
    variants.append(Variant("MQA", 1))
    every = lambda p: (p,) * n_layers  # noqa: E731
    variants += [
        Variant(f"Window({window})", None, every(SlidingWindow(window))),
        Variant(f"Strided({stride})", None, every(Strided(stride))),
        Variant(f"Fixed({stride},{summary})", None, every(Fixed(stride, summary))),
        Variant(f"Mix(W{window}x{n_layers - 1}+Full)", None, (SlidingWindow(window),) * (n_layers - 1) + (Causal(),)),
    ]
    return variants


def kept_keys(pattern: Optional[Pattern], context: int) -> int:
    """Cached tokens a decoder must still hold after ``context`` tokens: the keys ``j < context``
    that some later query ``context <= i < 2 * context`` may attend to. A causal layer keeps all
    ``context``; ``SlidingWindow(w)`` keeps ``w - 1``; a periodic pattern keeps its residues.
    (Counted from the pattern itself; queries more than ``context`` ahead are not looked at.)"""
    pattern = pattern or Causal()
    band = shared_band(pattern)
    if band is not None and band[0] >= 0 and band[1] != float("inf"):
        return min(int(band[1]), context)  # keys with context - j <= the band's reach
    j = torch.arange(context)[None, :]
    needed = torch.zeros(context, dtype=torch.bool)
    for start in range(context, 2 * context, 256):  # row chunks keep long contexts in memory
        i = torch.arange(start, min(start + 256, 2 * context))[:, None]
        needed |= pattern.allows(i, j).any(0)
        if bool(needed.all()):
            break
    return int(needed.sum())


def cost(config: LlamaConfig, context: int, dtype_bytes: int = 2) -> dict:
    """What a variant costs: parameters (as ``attnkit arch`` counts them), KV-cache bytes per token
    of a dense cache, and bytes per token of a cache holding only the keys the patterns can still
    use at ``context`` (windows: a rolling cache)."""
    per_layer_token = 2 * config.n_kv_heads * config.head_dim * dtype_bytes
    patterns = config.layer_patterns or (None,) * config.n_layers
    kept = sum(kept_keys(p, context) for p in patterns) * per_layer_token
    return {
        "parameters": parameters(config)["total"],
        "kv_bytes_per_token": kv_bytes_per_token(config, dtype_bytes),
        "kv_bytes_per_token_at_context": kept / context,
        "context": context,
        "kv_dtype_bytes": dtype_bytes,
    }
