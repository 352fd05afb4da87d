"""Sinks in ``nn.MultiHeadAttention`` (training, cached decoding) and the StreamingLLM ``SinkCache``:
generation through the cache equals full attention restricted to the cache's pattern."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit import Causal, SlidingWindow, attention
from attnkit.nn import MultiHeadAttention, RotaryEmbedding, SinkCache, sink_pattern
from attnkit.nn.kv_cache import EMPTY, SlotCache


def _layer(pattern, *, sinks=True, n_kv_heads=2, seed=0):
    torch.manual_seed(seed)
    layer = MultiHeadAttention(32, 4, n_kv_heads, pattern=pattern, sinks=sinks,
                               rope=RotaryEmbedding(8, theta=50.0)).double()
    if sinks:
        with torch.no_grad():
            layer.sinks.normal_(0.0, 2.0)
    return layer


def test_sinks_are_a_per_head_parameter_off_by_default():
    assert MultiHeadAttention(16, 4).sinks is None
    layer = MultiHeadAttention(16, 4, 2, sinks=True)
    assert isinstance(layer.sinks, nn.Parameter) and layer.sinks.shape == (4,)
    assert torch.equal(layer.sinks.detach(), torch.zeros(4))
    plain = sum(p.numel() for p in MultiHeadAttention(16, 4, 2).parameters())
    assert sum(p.numel() for p in layer.parameters()) == plain + 4
    assert "sinks" in layer.state_dict()
    with pytest.raises(TypeError, match="MultiHeadAttention: sinks must be True or False"):
        MultiHeadAttention(16, 4, sinks="yes")


def test_layer_equals_functional_attention_with_its_sinks_and_trains_them():
    layer = _layer(Causal())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = layer.project_qkv(x)
    expected = layer.o_proj(attention(q, k, v, Causal(), sinks=layer.sinks).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.sinks.grad is not None and bool((layer.sinks.grad != 0).all())


@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(3)], ids=repr)
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_cached_decoding_with_sinks_equals_the_full_forward(pattern, n_kv_heads):
    layer = _layer(pattern, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    full = layer(x)
    caches = [layer.make_cache(batch=2, max_len=12)]
    if pattern == SlidingWindow(3):
        caches.append(layer.make_rolling_cache(batch=2))
    for cache in caches:
        with torch.no_grad():
            steps = [layer(x[:, :4], cache=cache)] + [layer(x[:, i : i + 1], cache=cache) for i in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, msg=lambda m, c=cache: f"{type(c).__name__}: {m}")


def test_sink_pattern_is_the_first_keys_union_a_window():
    mask = sink_pattern(2, 3).mask(8, 8)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    assert torch.equal(mask, (j <= i) & ((j < 2) | (i - j < 3)))


def test_sink_cache_keeps_the_first_tokens_and_the_window_only():
    cache = SinkCache(1, 1, 2, 3, 1, dtype=torch.float64)
    values = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    cache.update(torch.arange(7), values[:, :, :7], values[:, :, :7])  # a prompt longer than the window
    assert sorted(p for p in cache.positions.tolist() if p != EMPTY) == [0, 1, 4, 5, 6]
    for p in range(7, 10):
        cache.update(torch.tensor([p]), values[:, :, p : p + 1], values[:, :, p : p + 1])
    assert sorted(p for p in cache.positions.tolist() if p != EMPTY) == [0, 1, 7, 8, 9]
    held = cache.positions != EMPTY
    assert torch.equal(cache.keys[0, 0, held, 0], cache.positions[held].double())  # each key at its position
    assert cache.keys.shape[2] == 2 + 3 + 1 and cache.length == 10


class _TinyLM(nn.Module):
    def __init__(self, pattern):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(40, 32)
        self.attn = _layer(pattern, seed=3)
        self.head = nn.Linear(32, 40)
        self.double()

    def forward(self, ids, cache=None):
        return self.head(self.attn(self.embed(ids), cache=cache))


@pytest.mark.parametrize("prompt", [3, 9])  # shorter and longer than sinks + window
def test_generation_through_a_sink_cache_equals_full_attention_restricted_to_its_pattern(prompt):
    pattern = sink_pattern(2, 4)
    model = _TinyLM(pattern)
    ids = torch.randint(0, 40, (2, prompt), generator=torch.Generator().manual_seed(prompt))
    cache = SinkCache(2, 2, 2, 4, 8, dtype=torch.float64)
    generated = ids
    with torch.no_grad():
        logits = model(ids, cache=cache)
        for _ in range(12):
            token = logits[:, -1:].argmax(-1)
            generated = torch.cat([generated, token], dim=1)
            logits = model(token, cache=cache)
            expected = model(generated)[:, -1:]  # the whole text, masked by the pattern
            torch.testing.assert_close(logits, expected)
    assert cache.stored == 6


def test_a_full_cache_with_the_same_layer_differs_from_the_sink_cache():
    """The oracle can fail: past the window, a cache that keeps everything sees other keys."""
    layer = _layer(Causal())
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    restricted = _layer(sink_pattern(2, 4))
    assert (layer(x) - restricted(x))[:, 6:].abs().max() > 1e-3


def test_cache_checks_refuse_patterns_that_need_evicted_keys():
    layer = MultiHeadAttention(16, 4, 2, pattern=Causal())
    with pytest.raises(ValueError, match=r"SinkCache: pattern must be sink_pattern\(k, w\) with k <= 2 and w <= 3"):
        with torch.no_grad():
            layer(torch.randn(1, 2, 16), cache=SinkCache(1, 2, 2, 3, 4))
    for fits in (sink_pattern(2, 3), sink_pattern(1, 2), SlidingWindow(3)):
        SinkCache(1, 2, 2, 3, 4).check_pattern(fits)
    for wrong in (sink_pattern(3, 3), sink_pattern(2, 4), SlidingWindow(3, causal=False), Causal()):
        with pytest.raises(ValueError, match="SinkCache: pattern"):
            SinkCache(1, 2, 2, 3, 4).check_pattern(wrong)
    with pytest.raises(ValueError, match="SinkCache: n_sink must be a positive integer"):
        SinkCache(1, 2, 0, 3, 4)
    assert isinstance(SinkCache(1, 2, 2, 3, 4), SlotCache)  # one protocol, one base
