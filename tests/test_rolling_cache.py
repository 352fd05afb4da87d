"""Rolling KV cache: window-sized memory; decoding with it equals recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from attnkit import Causal, SlidingWindow, Strided
from attnkit.nn import MultiHeadAttention, RollingKVCache, RotaryEmbedding


def _layer(window: int, n_kv_heads: int, rope: bool) -> MultiHeadAttention:
    torch.manual_seed(0)
    hook = RotaryEmbedding(8, theta=100.0) if rope else None
    return MultiHeadAttention(32, 4, n_kv_heads, pattern=SlidingWindow(window), rope=hook).double()


@given(
    window=st.integers(1, 9),
    chunks=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    n_kv_heads=st.sampled_from([1, 2, 4]),
    rope=st.booleans(),
)
def test_decoding_in_chunks_equals_full_recomputation(window, chunks, n_kv_heads, rope):
    layer = _layer(window, n_kv_heads, rope)
    x = torch.randn(2, sum(chunks), 32, dtype=torch.float64)
    expected = layer(x)
    cache = layer.make_rolling_cache(batch=2)
    assert cache.keys.shape == (2, n_kv_heads, window, 8)  # window-sized memory, whatever the length
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(layer(x[:, start : start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), expected.detach(), rtol=1e-10, atol=1e-10)
    assert cache.length == start and cache.stored == min(start, window)


def test_a_smaller_pattern_window_works_with_a_larger_cache():
    layer = _layer(3, 2, rope=False)
    cache = RollingKVCache(1, 2, 8, 8, dtype=torch.float64)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    steps = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(20)], dim=1)
    torch.testing.assert_close(steps, layer(x), rtol=1e-10, atol=1e-10)


def test_gradients_reach_the_new_tokens_and_not_the_cache():
    layer = _layer(4, 2, rope=False)
    cache = layer.make_rolling_cache(batch=1)
    outs = [layer(torch.randn(1, 2, 32, dtype=torch.float64), cache=cache) for _ in range(4)]
    torch.cat(outs, dim=1).sum().backward()
    assert layer.k_proj.weight.grad is not None and cache.keys.grad_fn is None


@pytest.mark.parametrize("pattern", [Causal(), Strided(4), SlidingWindow(9), SlidingWindow(3, causal=False)])
def test_patterns_that_need_older_tokens_are_rejected(pattern):
    layer = MultiHeadAttention(16, 2, pattern=pattern)
    cache = RollingKVCache(1, 2, 8, 8)
    with pytest.raises(ValueError, match="RollingKVCache: pattern must be a causal sliding window of at most 8 keys"):
        layer(torch.randn(1, 1, 16), cache=cache)


def test_make_rolling_cache_needs_a_window_pattern():
    with pytest.raises(ValueError, match="make_rolling_cache: the pattern must be a causal sliding window"):
        MultiHeadAttention(16, 2, pattern=Causal()).make_rolling_cache(1)


@pytest.mark.parametrize(
    "name, args, error, message",
    [("batch", (0, 1, 4, 8), ValueError, "must be a positive integer"),
     ("window", (1, 1, -2, 8), ValueError, "must be a positive integer"),
     ("head_dim", (1, 1, 4, 1.5), TypeError, "must be an int")],
)
def test_bad_sizes_are_rejected(name, args, error, message):
    with pytest.raises(error, match=f"RollingKVCache: {name} {message}"):
        RollingKVCache(*args)


def test_update_checks_shapes():
    cache = RollingKVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"RollingKVCache.update: k \(1, 3, 1, 8\)"):
        cache.update(torch.tensor([0]), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
