"""``attnkit patterns``: terminal rendering, PNG output, densities and block-mask vs plan costs."""

from __future__ import annotations

import pytest

from attnkit import Causal, SlidingWindow, Strided
from attnkit.analysis.pattern_view import block_costs, render
from attnkit.cli import main


def test_render_draws_the_mask_row_by_row():
    assert render(Strided(2), 5).splitlines() == ["#....", "##...", "###..", ".###.", "#.###"]


def test_strided_command_prints_the_pattern_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "strided.png"
    assert main(["patterns", "strided", "--stride", "4", "-n", "12", "--at", "1024", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Strided(stride=4)" in text and "#...#####..." in text  # row 11: keys 3, 7-11
    assert "cost at N=1024" in text and "37.5%" in text  # density of the 12 x 12 mask: 54 / 144
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_command_draws_the_four_variants_side_by_side(tmp_path, capsys):
    out = tmp_path / "seed.png"
    assert main(["patterns", "seed", "-n", "16", "--at", "512", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("causal", "sliding window 8", "strided, stride 4", "fixed, stride 4, summary 1"):
        assert name in text
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["patterns", "strided", "--stride", "0"], "Strided: stride must be a positive integer, got 0"),
        (["patterns", "fixed", "--stride", "4", "--summary", "5"], "summary must be at most stride"),
        (["patterns", "window", "-n", "0"], "-n must be between 1 and 96"),
        (["patterns", "causal", "--at", "-1"], "--at must be positive"),
        (["patterns", "causal", "--out", "/no/such/dir/x.png"], "directory /no/such/dir does not exist"),
    ],
)
def test_bad_arguments_end_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_block_mask_visits_half_the_blocks_for_strided_and_the_plan_far_fewer():
    costs = block_costs(Strided(128), 2048, 128)
    assert costs.blocks == 16 * 17 // 2 and costs.block_mask > 0.5
    assert costs.sparse_plan < 0.25 * costs.block_mask and costs.allowed < costs.sparse_plan
    window = block_costs(SlidingWindow(256), 2048, 128)
    assert window.sparse_plan < window.block_mask
    assert block_costs(Causal(), 512, 128).allowed == pytest.approx(513 / 1024)
