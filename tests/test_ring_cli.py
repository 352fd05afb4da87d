"""``attnkit ring``: a real torchrun launch on 2 processes, and argument errors as one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from attnkit.cli import main


def _ring(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "attnkit.cli", "ring", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_ring_command_runs_checks_and_reports(tmp_path):
    report = tmp_path / "ring.json"
    result = _ring("--nproc", "2", "--seq", "256", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                   "--dtype", "float64", "--json", str(report))
    assert result.returncode == 0, result.stderr
    assert "attnkit ring: N=256 B=1 Hq=4 Hkv=2 D=16 causal zigzag float64, 2 ranks" in result.stdout
    assert "0-63, 192-255" in result.stdout and "64-191" in result.stdout  # zigzag chunks per rank
    data = json.loads(report.read_text())
    assert [r["rank"] for r in data["reports"]] == [0, 1]
    assert all(r["steps"] == 2 and r["bytes_sent"] > 0 and r["peak_rss"] > 0 for r in data["reports"])
    assert set(data["errors"]) == {"out", "dq", "dk", "dv"}
    assert max(data["errors"].values()) < 1e-6


@pytest.mark.slow
def test_ring_command_window_skips_steps_on_four_ranks(tmp_path):
    report = tmp_path / "ring.json"
    result = _ring("--nproc", "4", "--seq", "2048", "--pattern", "window:100", "--layout", "contiguous",
                   "--heads", "2", "--head-dim", "16", "--json", str(report))
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert all(r["steps"] == 2 for r in data["reports"])  # ceil(100 / 512) + 1, not 4
    assert max(data["errors"].values()) < 1e-4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nproc", "3", "--seq", "1000"], "cannot be split by layout 'zigzag' over 3 ranks"),
        (["--pattern", "window:0"], "--pattern must be one of full | causal | window:SIZE"),
        (["--pattern", "fixed:8"], "--pattern must be one of full | causal | window:SIZE"),
        (["--heads", "6", "--kv-heads", "4"], "--heads (6) must be a multiple of --kv-heads (4)"),
        (["--nproc", "0"], "--nproc must be positive"),
        (["--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_bad_arguments_are_one_line_errors(capsys, args, message):
    assert main(["ring", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnkit: error: ") and message in err and err.count("\n") == 1


def test_a_worker_that_times_out_is_a_one_line_error_not_a_hang():
    # A 1 ms deadline cannot be met by the rendezvous or the first transfer: every rank fails, the
    # launcher reports the first rank's error as one line and exits with code 2.
    result = _ring("--nproc", "2", "--seq", "64", "--heads", "2", "--timeout", "0.001", timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: ")
