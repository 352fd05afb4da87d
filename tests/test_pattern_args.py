"""The one pattern spelling of the command line, through ``attnkit ring`` and ``attnkit patterns``."""

from __future__ import annotations

import pytest

from attnkit import Causal, Fixed, Full, SlidingWindow, Strided
from attnkit.cli import build_parser, main
from attnkit.cli.pattern_args import parse_pattern, parse_titled_pattern, pattern_syntax
from attnkit.cli.ring import case_from_args

RING_SYNTAX = "full | causal | window:SIZE | window-bidi:SIZE | strided:STRIDE | fixed:STRIDE:SUMMARY"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("full", Full()),
        ("causal", Causal()),
        ("window:100", SlidingWindow(100)),
        ("window-bidi:3", SlidingWindow(3, causal=False)),
        ("strided:8", Strided(8)),
        ("fixed:8:2", Fixed(8, 2)),
    ],
)
def test_ring_builds_every_spelling_into_its_case(text, expected, tmp_path):
    args = build_parser().parse_args(["ring", "--seq", "64", "--pattern", text])
    case = case_from_args(args, str(tmp_path))
    assert case.pattern == expected and case.pattern_name == text
    assert parse_pattern(text) == expected  # what each worker rebuilds from pattern_name


@pytest.mark.parametrize("text", ["window", "window:x", "window:0", "window:-3", "fixed:8", "strided:4:1",
                                  "full:1", "seed", "Causal", ""])
def test_ring_rejects_bad_spellings_in_one_line_listing_the_syntax(text, capsys):
    assert main(["ring", "--pattern", text]) == 2
    err = capsys.readouterr().err
    assert err == f"attnkit: error: --pattern must be one of {RING_SYNTAX}, got {text!r}\n"


@pytest.mark.parametrize(
    "kind, first_row, last_row",
    [
        ("full", "######", "######"),
        ("window:2", "#.....", "....##"),
        ("window-bidi:2", "##....", "....##"),
        ("strided:2", "#.....", ".#.###"),  # row 5: the band 3-5 (stride + 1 keys) and keys 1, 3
        ("fixed:3:1", "#.....", "..####"),  # row 5: its block 3-5 and the summary key 2
        ("window", "#.....", "..####"),  # bare: --window 4
    ],
)
def test_patterns_accepts_the_ring_spellings_too(kind, first_row, last_row, capsys):
    assert main(["patterns", kind, "--window", "4", "-n", "6", "--at", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if len(line) == 6 and set(line) <= {"#", "."}]
    assert rows[0] == first_row and rows[-1] == last_row


@pytest.mark.parametrize("kind", ["foo", "window:0", "fixed:4", "strided:two"])
def test_patterns_rejects_bad_spellings_in_one_line_listing_seed_and_the_syntax(kind, capsys):
    assert main(["patterns", kind]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnkit: error: kind must be one of seed | full | causal | ")
    assert "window[:SIZE]" in err and "fixed[:STRIDE:SUMMARY]" in err and repr(kind) in err


def test_bare_names_take_the_command_defaults_and_the_pattern_judges_them():
    defaults = {"SIZE": 5, "STRIDE": 4, "SUMMARY": 1}
    assert parse_titled_pattern("window", defaults=defaults) == ("sliding window 5", SlidingWindow(5))
    assert parse_titled_pattern("fixed", defaults=defaults) == ("fixed, stride 4, summary 1", Fixed(4, 1))
    with pytest.raises(ValueError, match="summary must be at most stride"):
        parse_titled_pattern("fixed", defaults={**defaults, "SUMMARY": 9})
    with pytest.raises(ValueError, match="--pattern must be one of"):
        parse_pattern("window")  # no defaults: the number is required


def test_syntax_marks_only_defaulted_numbers_optional():
    assert pattern_syntax() == RING_SYNTAX
    assert pattern_syntax(("STRIDE",)).split(" | ")[4:] == ["strided[:STRIDE]", "fixed:STRIDE:SUMMARY"]
