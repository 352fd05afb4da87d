"""The cache protocol: ``update(positions, k, v) -> (keys, values, k_positions)`` for the static and
rolling caches, and cached decoding through MultiHeadAttention equal to recomputing the sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit import Causal, Fixed, Full, PerHead, SlidingWindow, Strided
from attnkit.nn import KVCache, MultiHeadAttention, RollingKVCache
from attnkit.nn.kv_cache import EMPTY


def test_static_cache_writes_by_position_and_marks_empty_slots():
    cache = KVCache(1, 2, 6, 4, dtype=torch.float64)
    assert cache.length == 0 and cache.stored == 0
    k, v = torch.randn(1, 2, 2, 4, dtype=torch.float64), torch.randn(1, 2, 2, 4, dtype=torch.float64)
    keys, values, positions = cache.update(torch.tensor([3, 1]), k, v)
    assert keys.shape == (1, 2, 6, 4)  # the whole buffer: the same shape at every step
    assert positions.tolist() == [EMPTY, 1, EMPTY, 3, EMPTY, EMPTY]
    assert torch.equal(keys[:, :, 3], k[:, :, 0]) and torch.equal(values[:, :, 1], v[:, :, 1])
    assert cache.length == 4 and cache.stored == 2
    cache.reset()
    assert cache.length == 0 and not cache.keys.any()


def test_rolling_cache_returns_the_ring_before_the_call_then_the_new_tokens():
    cache = RollingKVCache(1, 1, 3, 2)
    for p in range(4):
        keys, _, positions = cache.update(torch.tensor([p]), torch.full((1, 1, 1, 2), float(p)), torch.zeros(1, 1, 1, 2))
    # position p lives in slot p % 3: before writing 3, the ring held 0, 1, 2
    assert positions.tolist() == [0, 1, 2, 3] and keys[0, 0, :, 0].tolist() == [0, 1, 2, 3]
    assert cache.positions.tolist() == [3, 1, 2] and cache.length == 4 and cache.stored == 3
    _, _, positions = cache.update(torch.arange(4, 9), torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2))
    assert positions.tolist() == [3, 1, 2, 4, 5, 6, 7, 8] and cache.positions.tolist() == [6, 7, 8]


def test_empty_slots_are_hidden_even_from_a_pattern_that_sees_everything():
    torch.manual_seed(0)
    layer = MultiHeadAttention(16, 4, 2, pattern=Full()).double()
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    cache = layer.make_cache(1, 8)
    with torch.no_grad():
        # one token at position 5 of an empty cache: the seven empty slots must not count as keys
        alone = layer(x, cache=cache, positions=torch.tensor([5]))
    torch.testing.assert_close(alone, layer(x, positions=torch.tensor([5])))


def _layer(pattern, n_kv_heads) -> MultiHeadAttention:
    torch.manual_seed(1)
    return MultiHeadAttention(32, 4, n_kv_heads, pattern=pattern).double()


@settings(deadline=None, max_examples=30)
@given(
    pattern=st.sampled_from([Causal(), SlidingWindow(3), Strided(3), Fixed(4, 1),
                             PerHead([Causal(), SlidingWindow(2), Strided(2), Causal()])]),
    chunks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    n_kv_heads=st.sampled_from([1, 2, 4]),
    spare=st.integers(0, 4),
)
def test_static_cache_decoding_in_chunks_equals_the_full_forward(pattern, chunks, n_kv_heads, spare):
    layer = _layer(pattern, n_kv_heads)
    x = torch.randn(2, sum(chunks), 32, dtype=torch.float64)
    expected = layer(x)
    cache = layer.make_cache(2, sum(chunks) + spare)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(layer(x[:, start : start + n], cache=cache, positions=torch.arange(start, start + n)))
            start += n
    torch.testing.assert_close(torch.cat(outs, dim=1), expected.detach(), rtol=1e-10, atol=1e-10)


def test_per_row_positions_need_cache_positions():
    layer = _layer(Causal(), 2)
    cache = layer.make_cache(2, 4)
    with torch.no_grad(), pytest.raises(ValueError, match=r"positions \(2, 1\) differ per row; give the cache_positions"):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache=cache, positions=torch.tensor([[0], [1]]))


def test_key_mask_is_indexed_by_cache_position():
    """Row 1 is left-padded by two tokens: with the padding hidden and its rotary positions
    shifted, it decodes as it would alone."""
    layer = _layer(Causal(), 2)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :2] = False
    rope_positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    cache = layer.make_cache(2, 8)
    with torch.no_grad():
        prefill = layer(x[:, :4], cache=cache, key_mask=mask, positions=rope_positions[:, :4],
                        cache_positions=torch.arange(4))
        steps = [layer(x[:, t : t + 1], cache=cache, key_mask=mask, positions=rope_positions[:, t : t + 1],
                       cache_positions=torch.tensor([t])) for t in (4, 5)]
    out = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(out[1, 2:], layer(x[1:, 2:])[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[0], layer(x[:1])[0], rtol=1e-10, atol=1e-10)
