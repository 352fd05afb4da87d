"""``nn.MultiHeadAttention(sinks=True)`` against transformers' gpt-oss eager attention, in float64.

A tiny random ``GptOssModel`` (a sliding-window layer, then a full one, GQA, biased projections)
runs twice: as transformers builds it, and with each ``GptOssAttention`` replaced by an attnkit
layer holding the same weights and sinks, rotated by gpt-oss's own rotary tables (so the
comparison is of attention, not of RoPE). The window (3) is much shorter than the sequence and
the sinks are large, so a sink counted twice, left out, or a window off by one moves the result
far beyond rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402

from attnkit import Causal, SlidingWindow  # noqa: E402
from attnkit.nn import MultiHeadAttention  # noqa: E402

WINDOW, N = 3, 11


def _tiny_model() -> modeling_gpt_oss.GptOssModel:
    config = modeling_gpt_oss.GptOssConfig(
        vocab_size=50, hidden_size=32, intermediate_size=16, num_hidden_layers=2, head_dim=8,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW, num_local_experts=2,
        num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"], experts_implementation="eager",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = modeling_gpt_oss.GptOssModel(config).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():  # O(1) weights: attention far from uniform
            parameter.normal_(0.0, 0.5)
        for layer in model.layers:
            layer.self_attn.sinks.normal_(0.0, 3.0)
    return model


class _Adapter(nn.Module):
    """Stands where a ``GptOssAttention`` stood: the same call, an attnkit layer inside."""

    def __init__(self, hf: modeling_gpt_oss.GptOssAttention, rotary: nn.Module):
        super().__init__()
        config = hf.config
        pattern = SlidingWindow(hf.sliding_window) if hf.sliding_window else Causal()

        def rope(q, k, positions):
            cos, sin = rotary(q, positions[None])
            return modeling_gpt_oss.apply_rotary_pos_emb(q, k, cos, sin)

        self.layer = MultiHeadAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim=hf.head_dim,
            pattern=pattern, bias=True, rope=rope, sinks=True, backend="auto",
        ).double()
        self.layer.load_state_dict(hf.state_dict())

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        return self.layer(hidden_states), None


def _swapped(model):
    ours = copy.deepcopy(model)
    for layer in ours.layers:
        layer.self_attn = _Adapter(layer.self_attn, ours.rotary_emb)
    return ours


def test_window_of_the_tiny_config_is_shorter_than_the_sequence():
    model = _tiny_model()
    assert [layer.self_attn.sliding_window for layer in model.layers] == [WINDOW, None]


@pytest.mark.parametrize("backend", ["auto", "reference", "blockwise", "sparse"])
def test_sinks_equal_gpt_oss_eager_attention_forward_and_gradients(backend):
    model = _tiny_model()
    ours = _swapped(model)
    for layer in ours.layers:
        layer.self_attn.layer.backend = backend
    ids = torch.randint(0, 50, (2, N), generator=torch.Generator().manual_seed(1))
    weight = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = model(ids).last_hidden_state
    got = ours(ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    (expected * weight).sum().backward()
    (got * weight).sum().backward()
    for theirs, mine in zip(model.layers, ours.layers):
        for name, parameter in theirs.self_attn.named_parameters():
            torch.testing.assert_close(
                mine.self_attn.layer.get_parameter(name).grad, parameter.grad, atol=1e-9, rtol=1e-9,
                msg=lambda m, name=name: f"gradient of {name}: {m}",
            )


def test_without_sinks_the_model_differs():
    """The oracle can fail: the same layers without their sinks give another result."""
    model = _tiny_model()
    ours = _swapped(model)
    for layer in ours.layers:
        with torch.no_grad():
            layer.self_attn.layer.sinks.fill_(float("-inf"))
    ids = torch.randint(0, 50, (1, N), generator=torch.Generator().manual_seed(1))
    difference = (ours(ids).last_hidden_state - model(ids).last_hidden_state).abs().max()
    assert difference > 1e-2
