"""The CLI on a tiny GGUF file: generate --prompt / --chat, the interactive chat, explain --model."""

from __future__ import annotations

import io
import sys

import pytest

from gguf_files import T, tiny_config, tiny_model, write_gguf
from attnkit.cli import main
from attnkit.models.llama import load_llama
from attnkit.models.tokenizer import load_text_tokenizer

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_model(tiny_config()), T.Q8_0)


def test_generate_prompt_and_chat_from_a_gguf_file(gguf_file, capsys):
    tokenizer = load_text_tokenizer(gguf_file)
    assert main(["generate", "--model", str(gguf_file), "--prompt", "the cat", "--max-new-tokens", "4",
                 "--stop-token", "0"]) == 0
    assert f"prefill: {len(tokenizer.encode('the cat'))} tokens" in capsys.readouterr().err
    chat_ids = tokenizer.chat_prompt("What is the capital of France?")
    assert tokenizer.decode(chat_ids) == "user\nWhat is the capital of France?\nassistant\n"  # specials skipped
    assert main(["generate", "--model", str(gguf_file), "--chat", "What is the capital of France?",
                 "--max-new-tokens", "3"]) == 0
    assert f"prefill: {len(chat_ids)} tokens" in capsys.readouterr().err
    assert main(["generate", "--model", str(gguf_file), "--chat", "  "]) == 2
    assert "--chat is empty" in capsys.readouterr().err


def test_generated_tokens_equal_the_library(gguf_file, capsys):
    model, tokenizer = load_llama(gguf_file), load_text_tokenizer(gguf_file)
    ids = tokenizer.encode("the cat")
    expected = model.generate([ids], 6, stop_tokens=())[0][len(ids):]
    assert main(["generate", "--model", str(gguf_file), "--prompt", "the cat", "--max-new-tokens", "6",
                 "--stop-token", "0", "--no-pack"]) == 0
    if 0 not in expected:
        assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


def test_interactive_chat_keeps_the_history(gguf_file, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/reset\nagain\nand more\n\nignored\n"))
    assert main(["chat", "--model", str(gguf_file), "--max-new-tokens", "3", "--speed", "--system", "Be brief."]) == 0
    err = capsys.readouterr().err
    prefills = [int(line.split()[1]) for line in err.splitlines() if line.startswith("prefill:")]
    assert len(prefills) == 3  # three messages; the empty line ends the session
    assert prefills[2] > prefills[1]  # the third message carries the second exchange


def test_explain_accepts_a_gguf_model(gguf_file, tmp_path, capsys):
    assert main(["explain", "the cat sat on the mat", "--model", str(gguf_file), "--out", str(tmp_path)]) == 0
    assert "llama" in capsys.readouterr().out
    assert list(tmp_path.glob("*.png"))
