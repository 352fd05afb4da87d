"""Attention implementations outside attnkit that the benchmarks time as peers.

- :func:`flex`: ``torch.compile(flex_attention)`` with a block mask of ``FLEX_BLOCK x FLEX_BLOCK``
  blocks created once per shape from the pattern's predicate;
- :func:`local_attention`: lucidrains' ``LocalAttention`` configured to compute exactly
  ``SlidingWindow(w)``: it masks ``i - j > window_size * look_backward`` when
  ``exact_windowsize=True``, so ``window_size = w - 1``, ``look_backward = 1``, ``causal=True``,
  ``autopad=True`` (buckets of ``w - 1`` queries, each seeing its own and the previous bucket), no
  rotary embedding, default scale ``1/sqrt(D)``.

Each returns ``(fn, None)``, or ``(None, why)`` when the peer cannot run here.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..patterns import BlockSparse, Pattern, SlidingWindow
from .contenders import AttentionFn

FLEX_BLOCK = 128

# Below this many (query, key) pairs the block mask is built eagerly from the dense predicate
# (16 MiB of booleans at most), which is far quicker than compiling the builder.
_EAGER_BLOCK_MASK_PAIRS = 2**24


def _mask_mod(pattern: Pattern, offset: int):
    """FlexAttention's ``mask_mod`` for ``pattern`` (bottom-right aligned by ``offset``)."""
    if isinstance(pattern, BlockSparse):
        layout, size = pattern.layout, pattern.block_size
        return lambda b, h, q_idx, kv_idx: layout[(q_idx + offset) // size, kv_idx // size]
    return lambda b, h, q_idx, kv_idx: pattern.allows(q_idx + offset, kv_idx)


@functools.cache
def compiled_flex():
    """``torch.compile(flex_attention)``, made once per process and shared by every workload.

    Dynamo still compiles one graph per pattern and shape (each ``mask_mod`` is traced into the
    kernel), but the wrapper, its caches and the import are not repeated per contender list.
    """
    from torch.nn.attention.flex_attention import flex_attention  # lazy: only when a flex row runs

    return torch.compile(flex_attention, dynamic=False)


def flex(pattern: Pattern) -> tuple[Optional[AttentionFn], Optional[str]]:
    """FlexAttention on ``pattern``, or why it cannot run (a torch without it)."""
    try:  # lazy: an optional part of torch, absent from older versions
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError:
        return None, "FlexAttention is not in this torch"

    @functools.lru_cache(maxsize=4)
    def block_mask(n_q: int, n_k: int, device: torch.device):
        return create_block_mask(
            _mask_mod(pattern, n_k - n_q), None, None, n_q, n_k, device=str(device), BLOCK_SIZE=FLEX_BLOCK,
            _compile=n_q * n_k > _EAGER_BLOCK_MASK_PAIRS,
        )

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = block_mask(q.shape[2], k.shape[2], q.device)
        return compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    return run, None


def local_attention(window: SlidingWindow) -> tuple[Optional[AttentionFn], Optional[str]]:
    """lucidrains' ``LocalAttention`` computing exactly the causal ``window``, or why not."""
    try:  # lazy: the optional "bench" extra
        from local_attention import LocalAttention
    except ImportError:
        return None, 'local-attention is not installed (pip install "attnkit[bench]")'
    if window.size < 2:
        return None, "local-attention needs a window of at least 2 keys"
    module = LocalAttention(
        window_size=window.size - 1, causal=True, look_backward=1, look_forward=0,
        exact_windowsize=True, autopad=True, dropout=0.0, use_rotary_pos_emb=False,
    )

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        if groups > 1:  # it has no GQA: K/V must be repeated
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return module(q, k, v)

    return run, None


__all__ = ["FLEX_BLOCK", "compiled_flex", "flex", "local_attention"]
