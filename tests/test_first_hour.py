"""What a new user meets first: python -m attnkit, models by name, quick errors for wrong paths,
Ctrl-C, and the generate / chat options that used to surprise."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.cli import main
from attnkit.models import catalog
from attnkit.models.catalog import NamedModel, resolve_model


def test_python_dash_m_attnkit_runs():
    result = subprocess.run([sys.executable, "-m", "attnkit", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout and "explain" in result.stdout


def test_a_wrong_model_path_is_reported_before_torch_is_imported(tmp_path):
    code = ("import sys; from attnkit.cli import main; "
            f"rc = main(['generate', '--model', {str(tmp_path / 'nope.gguf')!r}, '--prompt', 'hi']); "
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert result.stderr.strip().splitlines() == [
        f"attnkit: error: --model {tmp_path / 'nope.gguf'} does not exist: no file, directory or model name "
        f"({', '.join(m.name for m in catalog.MODELS)})"
    ]


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A catalog with one installed model ``fake`` (a file) and one missing ``absent``."""
    file = tmp_path / "fake.gguf"
    file.write_bytes(b"GGUF")
    monkeypatch.setattr(catalog, "MODELS", (
        NamedModel("fake", "Fake-1B, a test model", "pip install fake", lambda: file),
        NamedModel("absent", "Absent-2B, a missing model", "pip install absent", lambda: None),
    ))
    return file


def test_models_are_found_by_name_or_path(fake_model, tmp_path):
    assert resolve_model("fake") == fake_model
    assert resolve_model(None, default="fake") == fake_model
    assert resolve_model(str(tmp_path)) == tmp_path
    with pytest.raises(FileNotFoundError, match="the model absent \\(Absent-2B\\) is not installed: pip install absent"):
        resolve_model("absent")
    with pytest.raises(FileNotFoundError, match="no --model given and the default model \\(Absent-2B\\) is not"):
        resolve_model(None, default="absent")
    with pytest.raises(FileNotFoundError, match="--model nothing does not exist: no file, directory or model "
                                                "name \\(fake, absent\\)"):
        resolve_model("nothing")


def test_info_lists_the_models_and_where_they_are(fake_model, capsys):
    assert main(["info"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "fake: Fake-1B, a test model" in out and "not installed: pip install absent" in out


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    import attnkit.cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnkit.cli, "build_parser", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "attnkit: interrupted\n"


def test_max_new_tokens_0_loads_no_model(monkeypatch, capsys, fake_model):
    import attnkit.cli.generate

    def load(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(attnkit.cli.generate, "load", load)
    assert main(["generate", "--model", "fake", "--prompt", "hi", "--max-new-tokens", "0"]) == 0
    assert "no tokens generated (--max-new-tokens 0), so the model was not loaded" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny GGUF chat model whose context holds 64 positions."""
    from gguf_files import T, tiny_config, tiny_model, write_gguf

    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    return write_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf",
                      tiny_model(tiny_config(max_position_embeddings=64)), T.F16)


def test_top_k_without_temperature_is_noted_and_one_token_is_singular(chat_model, capsys):
    assert main(["generate", "--model", str(chat_model), "--prompt", "a", "--max-new-tokens", "1",
                 "--top-k", "5", "--stop-token", "0"]) == 0
    err = capsys.readouterr().err
    assert "note: --top-k applies only when sampling (--temperature > 0); decoding greedily" in err
    assert "prefill: 1 token in" in err


def test_chat_goes_on_when_the_conversation_outgrows_the_context(chat_model, capsys, monkeypatch):
    long = " ".join(["the cat sat"] * 4)  # about 40 tokens with the template: a second one cannot fit 64
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\n{long}\n/reset\nhi\n"))
    assert main(["chat", "--model", str(chat_model), "--max-new-tokens", "4", "--speed"]) == 0
    err = capsys.readouterr().err
    assert "do not fit the model's context of 64 tokens; /reset to start over" in err
    assert len([line for line in err.splitlines() if line.startswith("prefill:")]) == 2


def test_chat_refuses_a_max_new_tokens_that_leaves_no_room(chat_model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(chat_model), "--max-new-tokens", "64"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "attnkit: error: --max-new-tokens 64 leaves no room for a message: the model's context holds 64 tokens in all"
    ]


def _interrupting_stream(calls: list):
    """A ``stream`` whose first call yields one token and then meets Ctrl-C."""
    from attnkit.models import generate

    real = generate.stream

    def stream(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            yield torch.tensor([40])
            raise KeyboardInterrupt
        yield from real(*args, **kwargs)

    return stream


def test_ctrl_c_in_chat_ends_the_answer_not_the_conversation(chat_model, capsys, monkeypatch):
    from attnkit.models import generate

    calls = []
    monkeypatch.setattr(generate, "stream", _interrupting_stream(calls))
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    assert main(["chat", "--model", str(chat_model), "--max-new-tokens", "2", "--speed"]) == 0
    assert len(calls) == 2
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("prefill:")]) == 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ctrl_c_in_generate_is_reported_on_its_own_line(chat_model, monkeypatch, capsys):
    from attnkit.models import generate

    monkeypatch.setattr(generate, "stream", _interrupting_stream([]))
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["generate", "--model", str(chat_model), "--prompt", "a", "--no-pack"]) == 130
    assert capsys.readouterr().out  # the token shown before Ctrl-C, with no newline after it
    assert err.getvalue().endswith("\nattnkit: interrupted\n")


def test_arch_reads_a_gguf_file(chat_model, capsys):
    assert main(["arch", str(chat_model), "--json", "-"]) == 0
    assert '"total"' in capsys.readouterr().out


def test_arch_refuses_what_is_no_preset_name_or_path(capsys):
    assert main(["arch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-model' is neither a preset" in err and "a model name" in err


def test_explain_takes_a_model_name(fake_model, capsys):
    assert main(["explain", "a b c", "--model", "absent"]) == 2
    assert "the model absent (Absent-2B) is not installed" in capsys.readouterr().err


def test_main_module_exists():
    assert (Path(__import__("attnkit").__file__).parent / "__main__.py").is_file()
