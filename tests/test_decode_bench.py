"""``attnkit bench --case decode``: its arguments, and one real run on a tiny GGUF file (slow: each
contender is a process of its own)."""

from __future__ import annotations

import json

import pytest

from attnkit.bench import decode_peers
from attnkit.cli import main

from gguf_files import tiny_config, tiny_model, write_gguf


@pytest.mark.parametrize("argv, message", [
    (["--case", "decode", "--case", "causal"], "--case decode runs alone"),
    (["--case", "decode", "--threads", "0"], "--threads must be positive, got 0"),
    (["--case", "decode", "--busy", "-1"], "--busy must be zero or positive, got -1"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_counts_are_rejected_before_any_process_starts(tmp_path):
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        decode_peers.run_decode_peers(tmp_path / "none.gguf", [], threads=1, new_tokens=1, log_dir=tmp_path)
    with pytest.raises(ValueError, match="variant must be one of"):
        decode_peers.default_contenders(False, ("fp8",))


def test_busy_processes_spin_while_the_block_runs_and_are_killed_after():
    with decode_peers.busy_processes(2) as spinners:
        assert len(spinners) == 2 and all(s.poll() is None for s in spinners)
    assert all(s.poll() is not None for s in spinners)
    with pytest.raises(RuntimeError, match="boom"), decode_peers.busy_processes(1) as spinners:
        raise RuntimeError("boom")
    assert spinners[0].poll() is not None
    with pytest.raises(ValueError, match="busy must be a non-negative int, got -1"):
        with decode_peers.busy_processes(-1):
            pass


@pytest.mark.slow
def test_a_run_on_a_tiny_file_reports_every_contender(tmp_path):
    model = write_gguf(tmp_path / "tiny.gguf", tiny_model(tiny_config()))
    out = tmp_path / "decode.json"
    argv = ["bench", "--case", "decode", "--model", str(model), "--threads", "1", "--prompt-tokens", "24",
            "--new-tokens", "5", "--repeats", "1", "--variant", "bf16", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    names = [r["name"] for r in results]
    assert names[-2:] == ["attnkit (defaults)", "attnkit bf16"]
    assert len(names) == 3 if decode_peers.llama_cpp_available() else len(names) == 2
    for r in results:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_mib"] > 0
    assert len(results[-2]["tokens"]) == 5
