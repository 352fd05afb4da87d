"""The cost table and plot of docs/parallel.md (``attnkit.analysis.parallel_costs``)."""

from __future__ import annotations

import pytest

from attnkit.analysis.parallel_costs import layer_shape, main, markdown_table, scheme_costs, why_not_ulysses
from attnkit.distributed.costs import scheme_bytes
from attnkit.models.llama.config import PRESETS

SHAPE = layer_shape(PRESETS["llama3.1-8b"], 131072)


def test_schemes_on_64_ranks_leave_out_pure_ulysses_and_say_why():
    labels = [c.label for c in scheme_costs(SHAPE, 64)]
    assert labels == ["ring", "hybrid 2x32", "hybrid 4x16", "hybrid 8x8", "hybrid 16x4", "hybrid 32x2"]
    assert why_not_ulysses(SHAPE, 64) == "64 ranks > 32 query heads" and why_not_ulysses(SHAPE, 8) is None
    assert "| 64 | ulysses 64 | - | cannot run: 64 ranks > 32 query heads | - |" in markdown_table(SHAPE, [64], 32)


def test_costs_are_the_cost_models_with_the_ring_steps_of_a_causal_zigzag():
    costs = {c.label: c for c in scheme_costs(SHAPE, 8)}
    assert [c.ring_steps for c in costs.values()] == [8, 4, 2, 0]
    assert costs["ulysses 8"].bytes_per_rank == scheme_bytes("ulysses", SHAPE, 8)
    # Ulysses with even heads: 4 (U - 1) / U * n (Hq + Hkv) D b, plus 7 agreement fingerprints.
    assert costs["ulysses 8"].bytes_per_rank == 4 * 7 * 16384 * (32 + 8) * 128 * 2 // 8 + 7 * 136
    assert costs["hybrid 4x2"].bytes_per_rank == scheme_bytes("hybrid", SHAPE, 8, ulysses_degree=4, ring_steps=2)
    assert costs["ring"].bytes_per_rank > 3 * costs["ulysses 8"].bytes_per_rank


def test_main_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "costs.png"
    assert main([str(png), "--seq", "8192", "--ranks", "4", "64"]) == 0
    out = capsys.readouterr().out
    assert "| 4 | ulysses 4 |" in out and "| 64 | ulysses 64 | - | cannot run" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
