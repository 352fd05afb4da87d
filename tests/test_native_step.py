"""The native decoding step (``csrc/decode_step.c`` through :mod:`attnkit.models.native_step`)
against the torch step it replaces.

Oracle: the torch decoding step (``DecodeStep(..., native=False)``) of the same model on a copy of
the same prefilled caches. On tiny random quantized Llama and Gemma 3 models (quantized by the
``gguf`` package, so every product runs through the same blocks) and on the two shipped models,
each of 20 consecutive steps must give the same logits within float32 rounding (1e-4 of the
logits' scale: the two sides sum in different orders), write the same keys and values, and
greedy generation must give the same tokens. Gemma's tiny config has a window of 6 under a
prompt of 9 plus 20 steps, so its rolling caches wrap around many times.
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np
import pytest
import torch

from attnkit.kernels.native_step import LinearSpec, StepPlan, native_step_available
from attnkit.kernels.quant_native import set_kernel_threads
from attnkit.models.decode_step import DecodeStep
from attnkit.models.fuse import fuse_quantized_projections
from attnkit.models.gemma3 import Gemma3, Gemma3Config
from attnkit.models.generate import generate
from attnkit.models.llama import Llama, LlamaConfig
from attnkit.models.native_step import NativeStepUnsupported, native_step
from attnkit.models.quant import QuantizedEmbedding, QuantizedLinear, install_quantized, set_quant_activations

pytestmark = pytest.mark.skipif(not native_step_available(), reason="needs the native libraries (a C compiler)")

STEPS = 20


def _quantize(weight: torch.Tensor, fmt: str, kind: type):
    rows = gguf.quants.quantize(weight.detach().numpy().astype(np.float32), gguf.GGMLQuantizationType[fmt])
    return kind.from_gguf_rows(torch.from_numpy(np.ascontiguousarray(rows)), fmt)


def quantized_model(model, fmts=("Q8_0", "Q4_1", "Q5_0"), *, keep_float=(), fuse=True, seed=0):
    """``model`` with random O(1) weights, every matrix but those named in ``keep_float`` quantized
    (formats taken in turn from ``fmts``; the embedding and a tied head in Q8_0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.nn.functional.normalize(torch.randn_like(p), dim=-1) * (1 if "embed" in name else 3))
            else:
                p.copy_((0 if isinstance(model, Gemma3) else 1) + 0.1 * torch.randn_like(p))
    kept = {"embed_tokens.weight": _quantize(model.embed_tokens.weight, "Q8_0", QuantizedEmbedding)}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep_float]
    for i, (name, module) in enumerate(linears):
        kept[f"{name}.weight"] = _quantize(module.weight, fmts[i % len(fmts)], QuantizedLinear)
    install_quantized(model, kept, model.config.tie_embeddings)
    if fuse:
        fuse_quantized_projections(model)
    return model.eval()


def tiny_llama(**overrides):
    config = LlamaConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=120,
                                   rope_theta=10000.0, max_position_embeddings=256, norm_eps=1e-5,
                                   bos_token_id=1, eos_token_ids=(2,), tie_embeddings=True), **overrides})
    return Llama(config)


def tiny_gemma(**overrides):
    config = Gemma3Config(**{**dict(dim=64, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=96,
                                    vocab_size=120, sliding_window=6,
                                    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                                    max_position_embeddings=256, eos_token_ids=(1,)), **overrides})
    return Gemma3(config)


def prefilled(model, prompt: torch.Tensor, total: int):
    """Two identical sets of caches holding ``prompt (1, N)``, and the prompt's last logits."""
    positions = torch.arange(prompt.shape[1])
    caches = model.make_caches(1, total)
    logits = model(prompt, positions=positions, cache_positions=positions, caches=caches, key_mask=None,
                   last_only=True)[:, -1]
    twins = model.make_caches(1, total)
    for cache, twin in zip(caches, twins):
        for name in ("keys", "values", "positions"):
            getattr(twin, name).copy_(getattr(cache, name))
    return caches, twins, logits


@torch.no_grad()
def assert_steps_agree(model, prompt: torch.Tensor, steps: int = STEPS) -> None:
    """``steps`` consecutive steps (greedy tokens of the torch side) after ``prompt``: equal logits
    within float32 rounding, equal cache contents."""
    n = prompt.shape[1]
    reference_caches, native_caches, logits = prefilled(model, prompt, n + steps)
    reference = DecodeStep(model, reference_caches, None, native=False)
    native = DecodeStep(model, native_caches, None)
    assert reference.native is None and native.native is not None
    token = logits.argmax(-1)
    for step in range(steps):
        position = torch.tensor([n + step])
        expected, got = reference(token, position, position), native(token, position, position)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * scale, msg=lambda m: f"step {step}: {m}")
        token = expected.argmax(-1)
    for cache, twin in zip(reference_caches, native_caches):
        assert torch.equal(cache.positions, twin.positions)
        for name in ("keys", "values"):  # float32 rounding of the projections, relative to the cache's scale
            expected = getattr(cache, name)
            torch.testing.assert_close(getattr(twin, name), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def _prompt(model, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "own-head"])
def test_llama_steps_equal_the_torch_step(fuse, tied):
    model = quantized_model(tiny_llama(tie_embeddings=tied), fuse=fuse)
    assert_steps_agree(model, _prompt(model, 7))


def test_llama_with_a_float_layer_and_int8_activations():
    model = quantized_model(tiny_llama(), keep_float=("layers.1.mlp.down_proj", "layers.0.attn.o_proj"), fuse=False)
    set_quant_activations(model, "int8")
    assert_steps_agree(model, _prompt(model, 5))


def test_gemma3_steps_equal_the_torch_step_across_window_wraps():
    model = quantized_model(tiny_gemma())
    assert [type(c).__name__ for c in model.make_caches(1, 40)] == ["RollingKVCache", "KVCache", "RollingKVCache"]
    assert_steps_agree(model, _prompt(model, 9))  # window 6: the rings wrap three times


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attention_and_gate_on_the_pool_equal_the_torch_step_at_any_thread_count(family):
    """Sizes at which attention and the MLP's gate run on the kernels' pool (5 query heads over
    enough slots for >= 2^16 query-key products per layer; 1120 activations: chunks of 512 and a
    tail), on 1, 2 and 3 threads (5 heads leave an uneven share): the torch step's logits within
    float32 rounding, and the same logits bit for bit on every thread count (each chunk is
    computed as on one thread). Gemma's window of 120 wraps."""
    if family == "llama":
        model, n = quantized_model(tiny_llama(dim=320, n_heads=5, n_kv_heads=1, ffn_dim=1120)), 200
    else:
        model, n = quantized_model(tiny_gemma(n_heads=5, head_dim=128, sliding_window=120, ffn_dim=1120)), 110
    prompt, steps = _prompt(model, n), 12
    results = []
    try:
        for threads in (1, 2, 3):
            set_kernel_threads(threads)
            assert_steps_agree(model, prompt, steps)
            caches, _, logits = prefilled(model, prompt, n + steps)
            step, token, outs = DecodeStep(model, caches, None), logits.argmax(-1), []
            for i in range(steps):
                position = torch.tensor([n + i])
                outs.append(step(token, position, position))
                token = outs[-1].argmax(-1)
            results.append(torch.cat(outs))
    finally:
        set_kernel_threads(None)
    for result in results[1:]:
        assert torch.equal(result, results[0])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_greedy_generation_gives_the_torch_steps_tokens(family):
    model = quantized_model(tiny_llama() if family == "llama" else tiny_gemma())
    prompt = _prompt(model, 6, seed=3).tolist()
    native = generate(model, prompt, 32, stop_tokens=())
    assert native == generate(model, prompt, 32, stop_tokens=(), native=False)
    assert len(native[0]) == 6 + 32


def test_where_it_does_not_apply_the_torch_step_runs():
    model = quantized_model(tiny_llama())
    caches = model.make_caches(2, 10)
    with pytest.raises(NativeStepUnsupported, match="one row"):
        native_step(model, caches, None)
    assert DecodeStep(model, caches, None).native is None
    with pytest.raises(NativeStepUnsupported, match="padded"):
        native_step(model, model.make_caches(1, 10), torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(NativeStepUnsupported, match="a Linear, not a Llama or Gemma3"):
        native_step(torch.nn.Linear(2, 2), [], None)
    float_model = tiny_llama()
    with pytest.raises(NativeStepUnsupported, match="not a GGUF quantized model"):
        native_step(float_model, float_model.make_caches(1, 10), None)
    assert DecodeStep(model, model.make_caches(1, 10), None, native=False).native is None
    # padded rows generate through the torch step, with the tokens each row gets alone
    rows = generate(model, [[5, 6, 7], [8, 9]], 4, stop_tokens=())
    assert rows[1] == generate(model, [[8, 9]], 4, stop_tokens=())[0]


def test_bad_input_is_named():
    model = quantized_model(tiny_llama())
    step = native_step(model, model.make_caches(1, 4), None).plan
    with pytest.raises(ValueError, match="token 120 lies outside"):
        step.step(120, 0)
    with pytest.raises(ValueError, match="position 4 lies outside a static cache"):
        step.step(3, 4)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        step.step(3, 0, out=torch.empty(3))
    head = LinearSpec(torch.zeros(120, 64))
    with pytest.raises(ValueError, match="family must be one of"):
        StepPlan("gpt2", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, eps=1e-5, embed_scale=1.0,
                 embed=head, head=head, final_norm=torch.ones(64), layers=[])
    with pytest.raises(ValueError, match="final_norm must be a contiguous float32 CPU tensor"):
        StepPlan("llama", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, eps=1e-5, embed_scale=1.0,
                 embed=head, head=head, final_norm=torch.ones(64, dtype=torch.float64), layers=[])
    with pytest.raises(ValueError, match="head must be contiguous uint8 Q8_0 blocks"):
        StepPlan("llama", dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, eps=1e-5, embed_scale=1.0,
                 embed=head, head=LinearSpec(torch.zeros(120, 30, dtype=torch.uint8), "Q8_0"),
                 final_norm=torch.ones(64), layers=[])


@pytest.fixture
def used_native(monkeypatch):
    """The list of native steps made by ``DecodeStep`` while the test runs."""
    from attnkit.models import native_step as module

    made, original = [], module.native_step

    def spy(*args):
        made.append(original(*args))
        return made[-1]

    monkeypatch.setattr(module, "native_step", spy)
    return made


def test_generate_cli_and_bench_worker_take_the_native_step_unless_told(tmp_path, capsys, used_native):
    pytest.importorskip("tokenizers")
    from gguf_files import T, tiny_config, tiny_model, write_gguf
    from attnkit.bench.decode_worker import AttnkitRunner
    from attnkit.cli import main

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tiny_config()), T.Q8_0)
    command = ["generate", "--model", str(path), "--prompt", "the cat", "--max-new-tokens", "6", "--stop-token", "0"]
    previous = torch.get_num_threads()
    try:  # loading a quantized model sets torch's and the kernels' threads
        assert main(command) == 0 and len(used_native) == 1
        native_text = capsys.readouterr().out
        assert main([*command, "--no-native-step"]) == 0 and len(used_native) == 1
        assert capsys.readouterr().out == native_text
        for no_native_step, made in ((False, 2), (True, 2)):
            args = argparse.Namespace(model=str(path), threads=1, dtype=None, int8=False, activations=None,
                                      no_pack=False, compile=False, no_native_step=no_native_step)
            AttnkitRunner(args).run([5, 6, 7], 4)
            assert len(used_native) == made
    finally:
        set_kernel_threads(None)
        torch.set_num_threads(previous)
