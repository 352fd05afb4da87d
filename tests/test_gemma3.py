"""Gemma 3: parity with transformers' Gemma3ForCausalLM (logits, decode steps, caches), the Hugging
Face adapter's config forms, the config's checks and presets, caches that follow the layer pattern."""

import json

import pytest
import torch
from gemma_oracle import (VOCAB, WINDOW, float64_oracle, hf_cached_pairs, hf_config, hf_model, our_cached_pairs,
                          rel_error, transformers)

from attnkit.models.gemma3 import PRESETS, Gemma3, Gemma3Config, load_hf, parameter_shapes
from attnkit.models.gemma3.hf_checkpoint import config_from_hf
from attnkit.models.registry import identify
from attnkit.nn import KVCache, RollingKVCache
from attnkit.patterns import Causal, SlidingWindow

PROMPT = 23  # longer than the window (5): window layers and the global layer see different keys


def _pair(tmp_path, shape, seed=0, **config):
    hf = hf_model(hf_config(shape, **config), seed=seed)
    hf.save_pretrained(tmp_path)
    return hf, load_hf(tmp_path)


def _tokens(batch=2, n=PROMPT, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ["mqa", "gqa"])
def test_float64_logits_equal_transformers(tmp_path, shape):
    hf, ours = _pair(tmp_path, shape)
    hf, ours = hf.double(), ours.double()
    tokens = _tokens()
    with torch.no_grad(), float64_oracle(hf):
        expected = hf(tokens).logits
    with torch.no_grad():
        got = ours(tokens)
    assert got.dtype == torch.float64
    assert (got - expected).abs().max() < 1e-10


@pytest.mark.parametrize("shape", ["mqa", "gqa"])
def test_float32_logits_match_unpatched_transformers(tmp_path, shape):
    hf, ours = _pair(tmp_path, shape)
    tokens = _tokens()
    with torch.no_grad():
        assert rel_error(ours(tokens), hf(tokens).logits) < 1e-5


@pytest.mark.parametrize("change", [
    dict(window=WINDOW + 1), dict(query_scalar=16),
    dict(layer_types=["sliding_attention"] * 4),
    dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
])
def test_the_oracle_sees_each_setting(tmp_path, change):
    """The parity tests can fail: the same weights under one changed setting give other logits."""
    _, ours = _pair(tmp_path / "base", "mqa")
    hf = hf_model(hf_config("mqa", **change))
    tokens = _tokens()
    with torch.no_grad():
        assert rel_error(ours(tokens), hf(tokens).logits) > 1e-3


@pytest.mark.parametrize("shape", ["mqa", "gqa"])
def test_decode_steps_and_caches_equal_transformers(tmp_path, shape):
    hf, ours = _pair(tmp_path, shape, seed=2)
    hf, ours = hf.double(), ours.double()
    tokens = _tokens(n=PROMPT + 6, seed=3)
    caches = ours.make_caches(2, PROMPT + 6)
    hf_cache = transformers.DynamicCache(config=hf.config)
    with torch.no_grad(), float64_oracle(hf):
        expected = hf(tokens[:, :PROMPT], cache=hf_cache, use_cache=True).logits[:, -1]
        got = ours(tokens[:, :PROMPT], caches=caches, last_only=True)[:, -1]
        assert (got - expected).abs().max() < 1e-10
        for step in range(PROMPT, PROMPT + 6):
            expected = hf(tokens[:, step:step + 1], cache=hf_cache, use_cache=True).logits[:, -1]
            got = ours(tokens[:, step:step + 1], positions=torch.tensor([step]), caches=caches, last_only=True)[:, -1]
            assert (got - expected).abs().max() < 1e-10
    for i, (cache, layer) in enumerate(zip(caches, hf_cache.layers)):
        ours_kv, theirs_kv = our_cached_pairs(cache), hf_cached_pairs(layer)
        # transformers keeps the window - 1 keys a new token needs; attnkit's ring keeps the window.
        assert set(theirs_kv) <= set(ours_kv) and len(theirs_kv) >= (WINDOW - 1 if layer.is_sliding else PROMPT + 6)
        for position, (k, v) in theirs_kv.items():
            assert (ours_kv[position][0] - k).abs().max() < 1e-10, (i, position)
            assert (ours_kv[position][1] - v).abs().max() < 1e-10, (i, position)


def test_caches_follow_the_layer_pattern(tmp_path):
    _, ours = _pair(tmp_path, "mqa")
    caches = ours.make_caches(3, 40)
    assert [type(c) for c in caches] == [RollingKVCache, KVCache, RollingKVCache, RollingKVCache]
    assert [tuple(c.keys.shape) for c in caches] == [(3, 1, WINDOW, 16), (3, 1, 40, 16), (3, 1, WINDOW, 16),
                                                    (3, 1, WINDOW, 16)]
    short = ours.make_caches(1, WINDOW)  # no longer than the window: a static cache is as small
    assert all(isinstance(c, KVCache) and c.max_len == WINDOW for c in short)


def test_generate_equals_transformers_greedy_and_batches_alone(tmp_path):
    hf, ours = _pair(tmp_path, "gqa", seed=4)
    hf, ours = hf.double(), ours.double()
    prompt = _tokens(batch=1, n=12, seed=5)
    with torch.no_grad(), float64_oracle(hf):
        expected = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 12:].tolist()
    got = ours.generate(prompt, 10, stop_tokens=[])[0, 12:].tolist()
    assert got == expected
    short = [3, 9, 27, 81]
    alone = ours.generate([short], 10, stop_tokens=[])[0]
    batched = ours.generate([prompt[0].tolist(), short], 10, stop_tokens=[])
    assert batched[1] == alone and batched[0][12:] == expected


def test_layers_carry_their_patterns_scale_and_norms(tmp_path):
    _, ours = _pair(tmp_path, "mqa")
    patterns = [layer.attn.pattern for layer in ours.layers]
    assert patterns == [SlidingWindow(WINDOW), Causal(), SlidingWindow(WINDOW), SlidingWindow(WINDOW)]
    assert ours.layers[0].attn.scale == pytest.approx(24.0 ** -0.5)
    assert ours.layers[0].attn.rope is ours.local_rope and ours.layers[1].attn.rope is ours.global_rope
    assert ours.head_weight is ours.embed_tokens.weight and ours.lm_head is None


def test_legacy_and_new_config_forms_read_alike(tmp_path):
    new = json.loads(hf_config("gqa").to_json_string())
    legacy = json.loads(hf_config("gqa", legacy=True).to_json_string())
    legacy.pop("rope_parameters", None)
    legacy.update(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert "rope_parameters" in new and "rope_parameters" not in legacy
    a, b = config_from_hf(new), config_from_hf(legacy)
    assert a == b and a.rope_scaling.factor == 2.0 and a.rope_local_theta == 10000.0 and a.rope_theta == 1e6
    pattern = dict(legacy, sliding_window_pattern=2, num_hidden_layers=4)
    pattern.pop("layer_types")
    assert config_from_hf(pattern).layer_types == ("sliding_attention", "full_attention") * 2


def test_generation_config_adds_the_end_of_turn_token(tmp_path):
    hf = hf_model(hf_config("mqa"))
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 50]}))
    assert load_hf(tmp_path).config.eos_token_ids == (2, 50)
    checkpoint = identify(tmp_path)
    assert checkpoint.family.name == "gemma3" and checkpoint.layers_and_heads() == (4, 4)


@pytest.mark.parametrize("change, match", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "silu"}, "hidden_activation"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "gemma2"}, "model_type"),
    ({"layer_types": ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries for 4 layers"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}}, "yarn"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"num_key_value_heads": 3}, "n_kv_heads"),
])
def test_unsupported_configs_are_refused_with_the_field(change, match):
    raw = json.loads(hf_config("mqa").to_json_string())
    raw.update(change)
    with pytest.raises(ValueError, match=match):
        config_from_hf(raw, "dir/config.json")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(head_dim=15), ValueError, "even"),
    (dict(layer_types=("sliding_attention",)), ValueError, "1 entries for 2 layers"),
    (dict(layer_types="sliding_attention"), TypeError, "layer_types"),
    (dict(query_pre_attn_scalar=0.0), ValueError, "query_pre_attn_scalar"),
    (dict(eos_token_ids=(200,)), ValueError, "eos_token_ids"),
    (dict(rope_local_theta=-1.0), ValueError, "rope_local_theta"),
    (dict(rope_scaling=2.0), TypeError, "LinearRopeScaling"),
    (dict(tie_embeddings="true"), TypeError, "tie_embeddings"),
])
def test_inconsistent_configs_are_rejected(kwargs, error, match):
    base = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, vocab_size=100,
                eos_token_ids=(1,))
    with pytest.raises(error, match=match):
        Gemma3Config(**{**base, **kwargs})


def test_presets_match_the_published_models():
    small = PRESETS["gemma3-270m"]
    assert small.layer_types.count("full_attention") == 3 and small.layer_types[5] == "full_attention"
    assert (small.sliding_window, small.n_kv_heads, small.head_dim, small.scale) == (512, 1, 256, 1 / 16)
    big = PRESETS["gemma3-27b"]
    assert big.query_pre_attn_scalar == 168 and big.sliding_window == 1024 and big.rope_scaling.factor == 8.0
    assert big.layer_types.count("full_attention") == 10
    # Published parameter counts (text decoder, embeddings included): 268M and ~1.0B.
    counts = {name: sum(s.numel() for s in parameter_shapes(c).values()) for name, c in PRESETS.items()
              if name in ("gemma3-270m", "gemma3-1b")}
    assert 268_000_000 < counts["gemma3-270m"] < 269_000_000 and 999_000_000 < counts["gemma3-1b"] < 1_001_000_000
    with pytest.raises(ValueError, match="known presets"):
        Gemma3Config.preset("gemma3-2b")
    assert Gemma3Config.preset("gemma3-1b", n_layers=12).layer_types.count("full_attention") == 2


def test_bad_tokens_and_caches_are_rejected(tmp_path):
    _, ours = _pair(tmp_path, "mqa")
    with pytest.raises(ValueError, match="token ids must lie in"):
        ours(torch.tensor([[0, VOCAB]]))
    with pytest.raises(ValueError, match="caches has 1 entries for 4 layers"):
        ours(torch.tensor([[0, 1]]), caches=ours.make_caches(1, 8)[:1])
    with pytest.raises(TypeError, match="Gemma3Config"):
        Gemma3({"dim": 8})


def _cache_bytes(caches) -> int:
    return sum(buffer.nbytes for cache in caches for buffer in cache.buffers())


def test_window_layer_caches_do_not_grow_with_the_context():
    """Gemma 3 270M at 32k: 3 global layers x 32,768 positions + 15 window layers x 512, allocated."""
    config = PRESETS["gemma3-270m"]
    with torch.device("meta"):
        mixed, all_global = Gemma3(config), Gemma3(Gemma3Config.preset("gemma3-270m", layer_types=("full_attention",) * 18))
    per_position = 2 * config.n_kv_heads * config.head_dim * 4  # keys and values, float32
    sizes = {}
    for context in (2048, 32768):
        caches = mixed.make_caches(1, context, dtype=torch.float32, device="cpu")
        sizes[context] = _cache_bytes(caches)
        assert sizes[context] == (3 * context + 15 * 512) * per_position
        window_bytes = _cache_bytes(c for c, kind in zip(caches, config.layer_types) if kind == "sliding_attention")
        assert window_bytes == 15 * 512 * per_position
    full = _cache_bytes(all_global.make_caches(1, 32768, dtype=torch.float32, device="meta"))
    assert full == 18 * 32768 * per_position
    assert 5.5 < full / sizes[32768] < 5.6


def test_chat_template_is_gemmas():
    from attnkit.models.gemma3.chat import CHAT_TEMPLATE

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi \n"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    assert CHAT_TEMPLATE.render(chat) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="alternate"):
        CHAT_TEMPLATE.render([{"role": "assistant", "content": "Hi"}])


def test_packed_and_int8_models_generate_as_the_plain_one(tmp_path):
    """``generate`` packs a Gemma's linears for the CPU (or quantizes them with --int8), the tied head included."""
    from attnkit.models.cpu_pack import pack_for_cpu
    from attnkit.models.int8 import quantize_int8

    _, plain = _pair(tmp_path / "plain", "gqa", seed=6)
    prompt = _tokens(batch=1, n=12, seed=7)
    with torch.no_grad():
        expected = plain(prompt)
    packed = pack_for_cpu(load_hf(tmp_path / "plain"))
    assert packed.lm_head is not None and not isinstance(packed.layers[0].mlp.up_proj, torch.nn.Linear)
    with torch.no_grad():
        assert rel_error(packed(prompt), expected) < 1e-5
        assert rel_error(quantize_int8(load_hf(tmp_path / "plain"))(prompt), expected) < 0.05
