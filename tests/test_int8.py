"""Weight-only int8: the rounding bound, both product paths against the dequantized weight, a
quantized Llama close to the float one, the CLI flag, and the benchmark's own timing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnkit.models.int8 import Int8Linear, is_int8, quantize_int8, quantize_rows
from attnkit.models.llama import Llama, LlamaConfig


def test_rows_round_to_half_a_step():
    w = torch.randn(40, 96) * torch.logspace(-3, 2, 40)[:, None]
    w[7] = 0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and scales.shape == (40,)
    assert int(q.abs().max()) == 127
    assert bool(((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((q[7] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 40 rows take the dequantize-then-linear path
def test_product_equals_the_dequantized_weight(dtype, rows):
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(48, 64))
    x = torch.randn(2, rows, 64).to(dtype)
    expected = x.double() @ layer.dequantized(torch.float64).T
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(layer(x).double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))
    assert layer(x).dtype == dtype and layer(x).shape == (2, rows, 48)
    layer._fused = {(x.device.type, x.dtype): False}  # the fallback path for few rows too
    torch.testing.assert_close(layer(x).double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_widths_off_a_multiple_of_16_in_bfloat16_run_and_are_right():
    """torch 2.13's fused CPU kernel kills the process for bfloat16 with several rows and a width
    that is not a multiple of 16; the layer must keep such widths off it. Run in a child process
    so a crash fails this test instead of ending the session."""
    script = textwrap.dedent("""
        import torch
        from attnkit.models.int8 import Int8Linear
        torch.manual_seed(0)
        for width in (33, 40):
            layer = Int8Linear(torch.randn(40, width))
            for rows in range(1, 17):
                x = torch.randn(rows, width).bfloat16()
                expected = x.double() @ layer.dequantized(torch.float64).T
                torch.testing.assert_close(layer(x).double(), expected, rtol=3e-2,
                                           atol=3e-2 * float(expected.abs().max()))
        print("ok")
    """)
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": src, "OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_quantized_llama_stays_close_and_generates():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", tie_embeddings=True)).eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        reference = model(tokens)
        quantize_int8(model)
        logits = model(tokens)
    assert is_int8(model) and isinstance(model.lm_head, Int8Linear)
    error = float((logits - reference).abs().max() / reference.abs().max())
    assert 0 < error < 0.02
    out = model.generate([[1, 2, 3], [4]], 5, stop_tokens=())
    assert [len(r) for r in out] == [8, 6]
    with pytest.raises(ValueError, match="Int8Linear: x has 3 features"):
        model.lm_head(torch.zeros(1, 3))


def test_generate_command_int8(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from attnkit.cli import main

    Llama(LlamaConfig.preset("tiny")).save_pretrained(tmp_path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4", "--max-new-tokens", "3", "--int8",
                 "--stop-token", "0"]) == 0
    assert "prefill: 2 tokens" in capsys.readouterr().err


def test_bench_times_prefill_and_decode_directly(capsys):
    pytest.importorskip("transformers")
    from attnkit.bench import llama_bench

    config = LlamaConfig.preset("tiny")
    models = llama_bench.build_models(config, torch.float32, int8=True)
    assert set(models) >= {"transformers", "attnkit", "attnkit int8"}
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    result = llama_bench.measure(models, prompt, decode=3, repeats=1)
    for name in models:
        assert result[name]["prefill_s"] > 0 and result[name]["decode_s"] > 0
    assert result["greedy_tokens_agreeing"]["attnkit"] == [4]
    with pytest.raises(SystemExit):
        llama_bench.main(["--preset", "tiny", "--decode", "0"])
    assert "--decode must be a positive integer, got 0" in capsys.readouterr().err
