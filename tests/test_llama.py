"""LlamaConfig validation and presets, meta-device counting, cached vs uncached forward, patterns."""

import dataclasses

import pytest
import torch

from attnkit import SlidingWindow
from attnkit.models.llama import PRESETS, Llama, LlamaConfig, count_parameters
from attnkit.nn.rope import Llama3RopeScaling

TABLE = {  # preset: (dim, layers, heads, kv heads, ffn, head_dim, rope factor, tied, parameters)
    "llama3.1-8b": (4096, 32, 32, 8, 14336, 128, 8, False, 8_030_261_248),
    "llama3.1-70b": (8192, 80, 64, 8, 28672, 128, 8, False, 70_553_706_496),
    "llama3.1-405b": (16384, 126, 128, 8, 53248, 128, 8, False, 405_853_388_800),
    "llama3.2-1b": (2048, 16, 32, 8, 8192, 64, 32, True, 1_235_814_400),
    "llama3.2-3b": (3072, 28, 24, 8, 8192, 128, 32, True, 3_212_749_824),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_match_published_shapes_and_counts(name):
    dim, layers, heads, kv, ffn, head_dim, factor, tied, params = TABLE[name]
    c = LlamaConfig.preset(name)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.head_dim) == (dim, layers, heads, kv, ffn, head_dim)
    assert (c.rope_scaling.factor, c.tie_embeddings) == (factor, tied)
    assert (c.vocab_size, c.norm_eps, c.rope_theta, c.max_position_embeddings) == (128256, 1e-5, 500000.0, 131072)
    s = c.rope_scaling
    assert (s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (1.0, 4.0, 8192)
    assert count_parameters(c) == params


def test_meta_construction_allocates_nothing():
    with torch.device("meta"):
        model = Llama(LlamaConfig.preset("llama3.1-405b"))
    assert all(p.is_meta for p in model.parameters())


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown Llama preset 'llama4'.*llama3.1-8b.*tiny"):
        LlamaConfig.preset("llama4")


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=102), r"dim \(102\) must be divisible by n_heads \(4\)"),
    (dict(n_kv_heads=3), r"n_kv_heads \(3\) must divide n_heads \(4\)"),
    (dict(n_layers=0), "n_layers must be a positive integer"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(norm_eps=0.0), "norm_eps must be positive"),
    (dict(eos_token_ids=(999,)), "eos_token_ids"),
    (dict(layer_patterns=(None,)), "layer_patterns has 1 entries for 2 layers"),
])
def test_inconsistent_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.preset("tiny", **kwargs)


def test_config_is_frozen_and_derives_fields():
    c = LlamaConfig(dim=64, n_layers=1, n_heads=8, ffn_dim=128, vocab_size=10, bos_token_id=None, eos_token_ids=())
    assert (c.head_dim, c.n_kv_heads, c.kv_groups) == (8, 8, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dim = 32
    with pytest.raises(ValueError, match="factor must be >= 1"):
        Llama3RopeScaling(factor=0.5)


def _tiny(**overrides):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", **overrides)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    return model


def test_cached_decoding_equals_uncached_forward():
    model = _tiny()
    tokens = torch.randint(0, 256, (2, 90))
    with torch.no_grad():
        full = model(tokens)
        caches = model.make_caches(2, 90)
        pieces = [model(tokens[:, :70], caches=caches)]
        pieces += [model(tokens[:, i : i + 1], caches=caches) for i in range(70, 85)]
        pieces.append(model(tokens[:, 85:], caches=caches))
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)


def test_per_layer_patterns_change_only_what_they_should():
    window = _tiny(layer_patterns=(SlidingWindow(8), None))
    causal = _tiny()
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        a, b = window(tokens), causal(tokens)
        torch.testing.assert_close(a[:, :8], b[:, :8])  # the window covers everything up to 8 tokens
        assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3
        caches = window.make_caches(1, 40)
        steps = [window(tokens[:, :30], caches=caches)] + [window(tokens[:, i : i + 1], caches=caches) for i in range(30, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), a)


def test_tied_head_is_the_embedding():
    model = Llama(LlamaConfig.preset("tiny", tie_embeddings=True))
    assert model.lm_head is None and model.head_weight is model.embed_tokens.weight


def test_bad_tokens_are_rejected():
    model = Llama(LlamaConfig.preset("tiny"))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[0, 256]]))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="caches has 1 entries for 2 layers"):
        model(torch.zeros(1, 2, dtype=torch.long), caches=model.make_caches(1, 4)[:1])


def test_presets_dict_has_tiny():
    assert "tiny" in PRESETS and count_parameters(PRESETS["tiny"]) == sum(
        p.numel() for p in Llama(PRESETS["tiny"]).parameters()
    )
