"""Gemma 3 KV-cache arithmetic (window layers hold their window, global layers the context) and
``attnkit arch`` on Gemma 3 presets, files and configs."""

import json

import pytest
import torch

from attnkit.analysis.gemma_costs import all_global, kv_cache_bytes, report
from attnkit.cli import main
from attnkit.models.gemma3 import PRESETS, Gemma3


@pytest.mark.parametrize("name", ["gemma3-270m", "gemma3-4b"])
@pytest.mark.parametrize("context", [100, 512, 1024, 5000])
def test_formula_is_what_make_caches_allocates(name, context):
    config = PRESETS[name]
    for variant in (config, all_global(config)):
        with torch.device("meta"):
            model = Gemma3(variant)
        caches = model.make_caches(2, context, dtype=torch.bfloat16, device="meta")
        allocated = sum(buffer.nbytes for cache in caches for buffer in cache.buffers())
        assert kv_cache_bytes(variant, context, 2, batch=2) == allocated


def test_report_shows_the_saving_only_past_the_window():
    r = report(PRESETS["gemma3-270m"], context=32768)
    assert r["layers"] == {"window": 15, "global": 3, "sliding_window": 512}
    assert r["kv_cache"]["fp32"]["mixed"] == (3 * 32768 + 15 * 512) * 2 * 256 * 4
    assert 5.5 < r["kv_cache"]["bf16"]["ratio"] < 5.6
    rows = {row["context"]: row["ratio"] for row in r["kv_by_context"]}
    assert rows[512] == 1.0 and rows[2048] > 2.5 and max(rows) == 32768  # the model's longest context


def test_arch_command_on_gemma_presets(tmp_path, capsys):
    plot = tmp_path / "kv.png"
    assert main(["arch", "gemma3-1b", "--context", "32768", "--json", "-", "--plot", str(plot)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"]["global"] == 4 and 999_000_000 < data["parameters"] < 1_001_000_000
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["arch", "gemma3-27b"]) == 0
    out = capsys.readouterr().out
    assert "52 window layers (1,024 positions) + 10 global layers" in out and "all global / mix" in out


def test_arch_command_reads_a_gemma_config_json(tmp_path, capsys):
    from gemma_oracle import hf_config

    (tmp_path / "config.json").write_text(hf_config("gqa").to_json_string())
    for target in (tmp_path, tmp_path / "config.json"):
        assert main(["arch", str(target), "--json", "-"]) == 0
        assert json.loads(capsys.readouterr().out)["layers"] == {"window": 3, "global": 1, "sliding_window": 5}
    assert main(["arch", "gemma3-270m", "--batch", "0"]) == 2
    assert "batch must be a positive integer" in capsys.readouterr().err
