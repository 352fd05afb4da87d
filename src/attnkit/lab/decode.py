"""Decode speed at a long context: how fast a variant generates once ``context`` tokens are cached.

Each layer gets the cache its pattern allows: a :class:`~attnkit.nn.RollingKVCache` of ``w``
tokens for a causal ``SlidingWindow(w)`` layer, a static :class:`~attnkit.nn.KVCache` for every
other layer (attnkit has no cache that drops the keys Strided or Fixed no longer use, so those
variants decode against the whole context, masked by their pattern).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..models.llama import Llama
from ..nn.kv_cache import KVCache
from ..patterns import SlidingWindow


def layer_caches(model: Llama, batch: int, max_len: int) -> list:
    """One cache per layer: rolling for causal sliding windows, static ``max_len`` otherwise."""
    caches = []
    weight = model.embed_tokens.weight
    for layer in model.layers:
        attn = layer.attn
        pattern = attn.pattern
        if isinstance(pattern, SlidingWindow) and pattern.causal:
            caches.append(attn.make_rolling_cache(batch))
        else:
            caches.append(KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim, dtype=weight.dtype, device=weight.device))
    return caches


@torch.no_grad()
def decode_tokens_per_s(model: Llama, context: int, new_tokens: int, *, repeats: int = 3, prefill_chunk: int = 512) -> float:
    """Median tokens/s of greedily decoding ``new_tokens`` tokens one at a time (batch 1) after a
    prompt of ``context`` random tokens was prefilled (in chunks of ``prefill_chunk``); the
    prefill is not timed. Every forward call is given its positions, as ``generate`` gives them."""
    model.eval()
    device = model.embed_tokens.weight.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    rates = []
    for _ in range(repeats):
        caches = layer_caches(model, 1, context + new_tokens)
        for start in range(0, context, prefill_chunk):
            chunk = prompt[:, start : start + prefill_chunk]
            positions = torch.arange(start, start + chunk.shape[1], device=device)
            logits = model(chunk, positions=positions, caches=caches, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(new_tokens):
            positions = torch.arange(context + step, context + step + 1, device=device)
            token = model(token, positions=positions, caches=caches, last_only=True)[:, -1].argmax(-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)
