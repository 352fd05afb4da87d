"""Soft-capping equals transformers' Gemma 2 eager attention: a tiny random Gemma2Attention module
in float64 against attnkit's attention with ``softcap(attn_logit_softcapping)``, every backend that
applies it (its projections and rotary embedding are the module's own: what is compared is the
attention between them)."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import Causal, SlidingWindow, attention

gemma2 = pytest.importorskip("transformers.models.gemma2.modeling_gemma2")
from transformers import Gemma2Config  # noqa: E402

CAP = 2.0
"""Small against the scores below (query_pre_attn_scalar 1, weights scaled up), so that tanh bends
them: without the cap the result moves by far more than the tolerance."""


def _module(sliding_window: int) -> tuple:
    config = Gemma2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=1, attn_logit_softcapping=CAP,
        sliding_window=sliding_window, attn_implementation="eager",
    )
    torch.manual_seed(0)
    layers = [gemma2.Gemma2Attention(config, index).double().eval() for index in range(2)]
    for layer in layers:
        for weight in (layer.q_proj.weight, layer.k_proj.weight):
            torch.nn.init.normal_(weight, std=0.4)
    return config, layers


def _hf(layer, config, hidden, pattern):
    n = hidden.shape[1]
    rotary = gemma2.Gemma2RotaryEmbedding(config).double()
    positions = torch.arange(n)[None]
    cos, sin = rotary(hidden, positions)
    blocked = ~pattern.mask(n, n)
    mask = torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    return layer(hidden, (cos, sin), mask)[0], (cos, sin)


def _ours(layer, hidden, rope, pattern, backend, score_mod):
    batch, n, _ = hidden.shape
    shape = (batch, n, -1, layer.head_dim)
    q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    q, k = gemma2.apply_rotary_pos_emb(q, k, *rope)
    out = attention(q, k, v, pattern, scale=layer.scaling, backend=backend, score_mod=score_mod)
    return layer.o_proj(out.transpose(1, 2).reshape(batch, n, -1))


@pytest.mark.parametrize("backend", ["reference", "blockwise", "sparse", "auto"])
def test_softcap_equals_gemma2_eager_attention(backend):
    config, layers = _module(sliding_window=5)
    hidden = torch.randn(2, 23, config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # Layer 0 is a sliding-window layer in Gemma 2 (window 5: i - j < 5), layer 1 a global one.
    assert [layer.sliding_window for layer in layers] == [5, None]
    for layer, pattern in zip(layers, (SlidingWindow(5), Causal())):
        expected, rope = _hf(layer, config, hidden, pattern)
        with torch.no_grad():
            actual = _ours(layer, hidden, rope, pattern, backend, attnkit.softcap(config.attn_logit_softcapping))
            uncapped = _ours(layer, hidden, rope, pattern, backend, None)
        # transformers takes the softmax in float32 even for float64 inputs: float32 tolerances.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        assert (uncapped - expected).abs().max() > 1e-2  # the cap matters: this comparison can fail
