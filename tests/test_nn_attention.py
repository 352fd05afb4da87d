"""MultiHeadAttention: the seed's project / attend / concatenate / project, for MHA, GQA and MQA."""

from __future__ import annotations

import pytest
import torch

from attnkit import Causal, PerHead, Predicate, SlidingWindow, attention
from attnkit.nn import KVCache, MultiHeadAttention


@pytest.mark.parametrize("n_kv_heads", [None, 4, 2, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_count_matches_the_formula(n_kv_heads, bias):
    dim, n_heads, head_dim = 96, 8, 16
    layer = MultiHeadAttention(dim, n_heads, n_kv_heads, head_dim=head_dim, bias=bias)
    kv = n_heads if n_kv_heads is None else n_kv_heads
    expected = dim * head_dim * (n_heads + 2 * kv) + n_heads * head_dim * dim
    if bias:
        expected += head_dim * (n_heads + 2 * kv) + dim
    assert sum(p.numel() for p in layer.parameters()) == expected
    assert layer.n_kv_heads == kv


def test_forward_is_per_head_attention_then_concatenation_then_output_projection():
    torch.manual_seed(0)
    layer = MultiHeadAttention(24, 6, 2, pattern=Causal()).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    q = (x @ layer.q_proj.weight.T).view(2, 10, 6, 4).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(2, 10, 2, 4).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T).view(2, 10, 2, 4).transpose(1, 2)
    heads = []
    for h in range(6):  # every query head h reads KV head h // 3
        scores = q[:, h] @ k[:, h // 3].transpose(-1, -2) / 2.0
        scores = scores.masked_fill(~Causal().mask(10, 10), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, h // 3])
    expected = torch.cat(heads, dim=-1) @ layer.o_proj.weight.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize("pattern", [Causal(), SlidingWindow(3)])
def test_cached_decoding_token_by_token_equals_the_full_forward(n_kv_heads, pattern):
    torch.manual_seed(1)
    layer = MultiHeadAttention(32, 4, n_kv_heads, pattern=pattern).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.make_cache(batch=2, max_len=12)
    with torch.no_grad():
        prefill = layer(x[:, :4], cache=cache)
        steps = [layer(x[:, i : i + 1], cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full)
    assert cache.length == 9


def test_cache_refuses_grad_mode_with_a_clear_error():
    layer = MultiHeadAttention(16, 4, 2, pattern=Causal())
    cache = layer.make_cache(batch=1, max_len=6)
    with pytest.raises(RuntimeError, match="decode under torch.no_grad"):
        layer(torch.randn(1, 1, 16), cache=cache)
    with torch.no_grad():
        layer(torch.randn(1, 2, 16), cache=cache)
    assert cache.length == 2 and cache.keys.grad_fn is None


def test_key_mask_hides_padding_keys_and_leaves_real_rows_alone():
    torch.manual_seed(3)
    no_self = Predicate(lambda i, j: j < i)  # excludes the diagonal: row 0 sees nothing
    layer = MultiHeadAttention(16, 4, 2, pattern=no_self).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    everything = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(layer(x, key_mask=everything), layer(x))
    padded = everything.clone()
    padded[1, :2] = False  # row 1 is left-padded by two tokens
    out = layer(x, key_mask=padded)
    torch.testing.assert_close(out[0], layer(x[:1])[0])
    torch.testing.assert_close(out[1, 2:], layer(x[1:, 2:])[0], rtol=1e-10, atol=1e-10)
    assert torch.isfinite(out).all()


def test_per_head_pattern_must_match_the_head_count():
    with pytest.raises(ValueError, match="per-head for 2 heads, but n_heads is 4"):
        MultiHeadAttention(16, 4, pattern=PerHead([Causal(), Causal()]))


def test_rope_hook_receives_absolute_positions_including_the_cache_offset():
    seen = []

    def rope(q, k, positions):
        seen.append(positions.tolist())
        return q, k

    layer = MultiHeadAttention(8, 2, rope=rope, pattern=Causal())
    cache = layer.make_cache(1, 8)
    with torch.no_grad():
        layer(torch.randn(1, 3, 8), cache=cache)
        layer(torch.randn(1, 1, 8), cache=cache)
    layer(torch.randn(1, 2, 8), positions=torch.tensor([10, 11]))
    assert seen == [[0, 1, 2], [3], [10, 11]]


def test_gradients_flow_to_every_projection():
    layer = MultiHeadAttention(16, 4, 2, pattern=SlidingWindow(4), backend="blockwise")
    layer(torch.randn(2, 20, 16)).pow(2).mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dim": 0, "n_heads": 2}, "dim must be a positive integer"),
        ({"dim": 10, "n_heads": 4}, r"dim \(10\) must be divisible by n_heads \(4\)"),
        ({"dim": 16, "n_heads": 4, "n_kv_heads": 3}, r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"),
        ({"dim": 16, "n_heads": 4, "n_kv_heads": 0}, "n_kv_heads must be a positive integer"),
        ({"dim": 16, "n_heads": 4, "backend": "fast"}, "backend must be one of"),
    ],
)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)


def test_bad_forward_input_and_cache_overflow():
    layer = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, 8\), got \(2, 3, 9\)"):
        layer(torch.randn(2, 3, 9))
    cache = KVCache(1, 2, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="exceed max_len=4"):
        layer(torch.randn(1, 5, 8), cache=cache)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        KVCache(0, 2, 4, 4)


def test_head_dim_may_differ_from_dim_over_heads():
    layer = MultiHeadAttention(10, 4, 2, head_dim=6)
    assert layer(torch.randn(1, 5, 10)).shape == (1, 5, 10)
    assert layer.q_proj.out_features == 24 and layer.k_proj.out_features == 12


def test_layer_output_matches_functional_attention_on_its_projections():
    layer = MultiHeadAttention(16, 4, 1, pattern=Causal()).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64)
    q, k, v = layer.project_qkv(x)
    out = attention(q, k, v, Causal()).transpose(1, 2).reshape(1, 7, 16)
    torch.testing.assert_close(layer(x), layer.o_proj(out))
