"""The one pattern spelling of the command line, through ``attnkit ring`` and ``attnkit patterns``."""

from __future__ import annotations

import pytest

from attnkit import Causal, Fixed, Full, SlidingWindow, Strided
from attnkit.cli import build_parser, main
from attnkit.cli.pattern_args import parse_pattern, parse_titled_pattern, pattern_syntax, spelled_numbers
from attnkit.cli.ring import case_from_args

RING_SYNTAX = ("full | causal | window:SIZE | window-bidi:SIZE | strided:STRIDE | fixed:STRIDE:SUMMARY | "
               "document:LENGTHS | causal-document:LENGTHS")


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


@pytest.mark.parametrize("text", ["window", "window:x", "window:-3", "fixed:8", "strided:4:1",
                                  "full:1", "seed", "Causal", "", "window:²", "window:١", "strided:+4",
                                  "strided: 4", "window:3.0"])
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
    window = ["--window", "4"] if kind == "window" else []
    assert main(["patterns", kind, *window, "-n", "6", "--at", "256"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if len(line) == 6 and set(line) <= {"#", "."}]
    assert rows[0] == first_row and rows[-1] == last_row


@pytest.mark.parametrize("kind", ["foo", "fixed:4", "strided:two"])
def test_patterns_rejects_bad_spellings_in_one_line_listing_seed_and_the_syntax(kind, capsys):
    assert main(["patterns", kind]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("attnkit: error: kind must be one of seed | full | causal | ")
    assert "window[:SIZE]" in err and "fixed[:STRIDE:SUMMARY]" in err and repr(kind) in err


@pytest.mark.parametrize("argv, message", [
    (["window:0"], "kind window:0: SlidingWindow: size must be a positive integer, got 0"),
    (["window", "--window", "0"], "kind window: SlidingWindow: size must be a positive integer, got 0"),
    (["fixed:4:9"], "kind fixed:4:9: Fixed: summary must be at most stride (4), got 9"),
    (["window:99999999999999999999"], "kind window:99999999999999999999: SIZE 99999999999999999999 is more than 2**62"),
    (["strided", "--stride", str(2**63)], f"kind strided: STRIDE {2**63} is more than 2**62"),
], ids=["zero", "zero-option", "summary-above-stride", "beyond-int64", "beyond-int64-option"])
def test_numbers_a_pattern_cannot_take_are_named_in_one_line(argv, message, capsys):
    assert main(["patterns", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"attnkit: error: {message}")


def test_a_window_far_wider_than_the_sequence_is_shown_without_allocating_for_it(capsys):
    assert main(["patterns", "window", "--window", "1000000000", "-n", "8"]) == 0
    out = capsys.readouterr().out
    assert "########" in out and "sliding" in out and "1000000000" in out


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
    assert pattern_syntax(("STRIDE",)).split(" | ")[4:6] == ["strided[:STRIDE]", "fixed:STRIDE:SUMMARY"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["window:3", "--window", "9"], "kind window:3 and --window 9 both give the window size; give it once"),
        (["window-bidi:3", "--window", "3"], "kind window-bidi:3 and --window 3 both give the window size"),
        (["strided:4", "--stride", "8"], "kind strided:4 and --stride 8 both give the stride"),
        (["fixed:4:1", "--window", "9", "--summary", "2"], "kind fixed:4:1 and --summary 2 both give the summary"),
    ],
)
def test_patterns_refuses_a_number_given_both_ways(argv, message, capsys):
    # Before: the option was silently ignored and the kind's own number drawn.
    assert main(["patterns", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attnkit: error: {message}") and err.count("\n") == 1


def test_options_for_numbers_the_kind_leaves_out_still_apply(capsys):
    assert main(["patterns", "fixed", "--stride", "3", "--summary", "1", "-n", "6", "--at", "256"]) == 0
    assert "fixed, stride 3, summary 1" in capsys.readouterr().out
    assert main(["patterns", "strided:2", "--window", "9", "-n", "6", "--at", "256"]) == 0  # --window: no number of strided


def test_spelled_numbers_names_only_what_the_text_writes_out():
    assert spelled_numbers("window:3") == ("SIZE",) and spelled_numbers("fixed:4:1") == ("STRIDE", "SUMMARY")
    assert spelled_numbers("window") == () and spelled_numbers("fixed:4") == () and spelled_numbers("foo:1") == ()


def test_patterns_seed_says_why_the_causal_plan_computes_more_than_the_block_mask(capsys):
    assert main(["patterns", "seed", "-n", "8", "--at", "2048"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "The plan computes more than the block mask for causal: it runs query blocks of 128 rows" in out
    assert "more than the block mask for sliding" not in out
