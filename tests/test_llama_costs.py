"""Llama cost arithmetic (parameter components, KV-cache bytes, FLOPs) and the ``arch`` command."""

import json

import pytest

from attnkit.analysis.llama_costs import (
    compute_shares,
    decode_flops_per_token,
    kv_bytes_per_token,
    parameters,
    prefill_flops_per_token,
    report,
)
from attnkit.cli import main
from attnkit.models.llama import PRESETS, LlamaConfig, count_parameters


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_components_sum_to_the_meta_device_count(name):
    config = LlamaConfig.preset(name)
    p = parameters(config)
    assert p["total"] == count_parameters(config) == sum(v for k, v in p.items() if k != "total")


def test_llama31_8b_known_numbers():
    c = LlamaConfig.preset("llama3.1-8b")
    # 32 layers x 8 kv heads x 128 dims x (k, v) x 2 bytes = 128 KiB per token in bf16.
    assert kv_bytes_per_token(c, 2) == 131072
    r = report(c, context=8192, batch=2)
    assert r["kv_cache"]["MHA"]["kv_bytes_per_token"]["bf16"] == 4 * 131072
    assert r["kv_cache"]["MQA"]["kv_bytes_total"]["fp32"] == 32 * 128 * 2 * 4 * 8192 * 2
    assert r["kv_cache"]["MHA"]["parameters"] - r["parameters"]["total"] == 32 * 2 * 4096 * 128 * 24
    # Decode is about 2 FLOPs per parameter outside the embedding, plus attention over the context.
    non_embedding = r["parameters"]["total"] - r["parameters"]["embedding"]
    assert decode_flops_per_token(c, 1) == pytest.approx(2 * non_embedding, rel=1e-3)
    assert decode_flops_per_token(c, 8192) - decode_flops_per_token(c, 0) == 4 * 32 * 32 * 128 * 8192


def test_prefill_averages_the_causal_context_and_shares_shift_to_attention():
    c = LlamaConfig.preset("llama3.2-1b")
    assert prefill_flops_per_token(c, 1) == pytest.approx(decode_flops_per_token(c, 1))
    assert prefill_flops_per_token(c, 4096) < decode_flops_per_token(c, 4096)
    shares = compute_shares(c)
    assert all(abs(s["attention"] + s["mlp"] + s["head"] - 1) < 1e-12 for s in shares)
    assert shares[0]["attention"] < shares[0]["mlp"] and shares[-1]["attention"] > shares[-1]["mlp"]


def test_arch_command_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "shares.png"
    assert main(["arch", "llama3.2-1b", "--context", "4096", "--json", "-", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == 1_235_814_400 and data["context"] == 4096
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["arch", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "MQA" in out and "share of decode FLOPs" in out


def test_arch_command_reads_config_json(tmp_path, capsys):
    from attnkit.models.llama.hf_checkpoint import config_to_hf

    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(LlamaConfig.preset("llama3.2-3b"))))
    assert main(["arch", str(tmp_path / "config.json"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == 3_212_749_824


def test_arch_bad_input(capsys):
    assert main(["arch", "llama9"]) == 2
    assert "llama3.1-8b" in capsys.readouterr().err
    assert main(["arch", "tiny", "--context", "0"]) == 2
    assert "context must be a positive integer" in capsys.readouterr().err
