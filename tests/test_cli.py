"""The attnkit command line: info, bench, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnkit.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "blockwise" in out
    assert "reference: explicit two-step math" in out  # one "name: description" line per backend
    assert "native band_attention" in out


def test_bench_writes_json_rows_and_a_plot(tmp_path, capsys):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--seq", "64", "--seq", "130", "--repeats", "1",
                 "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0
    data = json.loads(json_path.read_text())
    contenders = {row["contender"] for row in data["rows"]}
    assert {"torch sdpa", "attnkit auto", "attnkit dense", "attnkit blockwise", "attnkit reference"} <= contenders
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["max_abs_err"] < 1e-4
    assert data["meta"]["torch"]
    assert png_path.stat().st_size > 1000
    assert "torch sdpa" in capsys.readouterr().out


def test_bench_backward_mode(tmp_path):
    path = tmp_path / "b.json"
    assert main(["bench", "--seq", "64", "--repeats", "1", "--backward", "--json", str(path)]) == 0
    assert {row["mode"] for row in json.loads(path.read_text())["rows"]} == {"fwd+bwd"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--seq", "0"], "--seq must be positive, got 0"),
        (["bench", "--repeats", "0"], "--repeats must be positive"),
        (["bench", "--seq", "8", "--json", "/no/such/dir/x.json"], "does not exist"),
        (["bench", "--device", "nonsense"], "--device"),
    ],
)
def test_bad_arguments_end_with_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error:") and message in err
    assert len(err.splitlines()) == 1


def test_console_entry_point_runs_and_rejects_unknown_commands():
    ok = subprocess.run([sys.executable, "-m", "attnkit.cli", "info"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "attnkit.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_building_the_parser_imports_no_optional_extra():
    # cli/__init__.py promises it: a missing extra must only affect the command that needs it.
    extras = ["matplotlib", "transformers", "tokenizers", "gguf", "jinja2", "sentence_transformers", "triton",
              "local_attention", "ring_attention_pytorch"]
    code = ("import sys; from attnkit.cli import build_parser; build_parser(); "
            f"print(sorted({{name.split('.')[0] for name in sys.modules}} & set({extras!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
