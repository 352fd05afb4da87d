"""``attnkit ring``: a real torchrun launch on 2 processes, and argument errors as one line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

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


@pytest.mark.parametrize("scheme, nproc, extra, steps", [
    ("ulysses", 2, [], 0),
    ("hybrid", 4, ["--ulysses-degree", "2"], 2),  # a ring of two Ulysses groups
])
def test_ring_command_runs_ulysses_and_hybrid(tmp_path, scheme, nproc, extra, steps):
    report = tmp_path / "scheme.json"
    result = _ring("--scheme", scheme, "--nproc", str(nproc), "--seq", "256", "--heads", "6", "--kv-heads", "2",
                   "--head-dim", "16", "--dtype", "float64", "--pattern", "window:40", *extra, "--json", str(report))
    assert result.returncode == 0, result.stderr
    grid = " (2 x 2)" if scheme == "hybrid" else ""
    assert f"window:40 zigzag float64, {nproc} ranks, {scheme}{grid}" in result.stdout
    data = json.loads(report.read_text())
    for r in data["reports"]:
        assert r["steps"] == steps and abs(r["bytes_sent"] - r["model_bytes"]) <= 0.05 * r["model_bytes"]
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
        (["--pattern", "window:0"], "--pattern window:0: SlidingWindow: size must be a positive integer, got 0"),
        (["--pattern", "fixed:8"], "--pattern must be one of full | causal | window:SIZE"),
        (["--heads", "6", "--kv-heads", "4"], "--heads (6) must be a multiple of --kv-heads (4)"),
        (["--nproc", "0"], "--nproc must be positive"),
        (["--timeout", "0"], "--timeout must be a positive, finite number of seconds"),
        (["--scheme", "ulysses", "--nproc", "4", "--heads", "2", "--seq", "64"],
         "--scheme ulysses needs --nproc (4) at most --heads (2)"),
        (["--scheme", "hybrid", "--nproc", "3", "--seq", "60"], "--scheme hybrid needs --ulysses-degree"),
        (["--scheme", "hybrid", "--nproc", "4", "--ulysses-degree", "3", "--seq", "64"],
         "--ulysses-degree (3) must divide --nproc (4)"),
        (["--ulysses-degree", "2"], "--ulysses-degree is for --scheme hybrid, not ring"),
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


def test_every_ring_option_has_help_text():
    from attnkit.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    ring = subcommands.choices["ring"]
    options = [a for a in ring._actions if a.option_strings and a.dest != "help"]
    assert {"--dtype", "--nproc", "--timeout"} <= {s for a in options for s in a.option_strings}
    assert [a.option_strings for a in options if not a.help] == []


_TORCHRUN_TAIL = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
attnkit.cli.ring_worker FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-28_22:54:18
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 13026)  (SIGTERM)
  error_file: <N/A>
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-28_22:54:18
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 13027)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 13027
=======================================================
"""


_ROOT_CAUSE_RANK_0 = _TORCHRUN_TAIL.replace("rank      : 1 (local_rank: 1)\n  exitcode  : -9", "rank      : 0 (local_rank: 0)\n  exitcode  : 2")


def test_failure_prefers_a_rank_own_error_to_what_the_others_saw(tmp_path):
    # torchrun's timestamps are whole seconds, so its root cause is mostly rank 0, which only saw
    # rank 1 leave; before, that consequence was the reported error instead of rank 1's own.
    from attnkit.cli.ring import failure

    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 2" in _ROOT_CAUSE_RANK_0
    lost = ("ring attention: rank 0 lost rank 1 during forward step 1 keys/values (to rank 1, from rank 1) "
            "after 0.0 s: the connection closed, the peer died (Connection closed by peer [127.0.0.1]:4321)")
    (tmp_path / "rank0.txt").write_text(f"RuntimeError\n{lost}\n1795906458.25")
    (tmp_path / "rank1.txt").write_text("ValueError\nscale must be finite, got nan\n1795906458.5")
    error = failure(_ROOT_CAUSE_RANK_0, 1, str(tmp_path))
    assert isinstance(error, ValueError) and str(error) == "scale must be finite, got nan"
    # Two ranks with errors of their own: the one written first.
    (tmp_path / "rank0.txt").write_text("RuntimeError\nout of memory\n1795906458.75")
    assert str(failure(_ROOT_CAUSE_RANK_0, 1, str(tmp_path))) == "scale must be finite, got nan"
    # Only consequences: the first one written; a wait that timed out is one too.
    (tmp_path / "rank0.txt").write_text(f"RuntimeError\n{lost}\n1795906458.75")
    (tmp_path / "rank1.txt").write_text("RuntimeError\nrank 1 failed during the start barrier: Timed out\n1795906458.5")
    assert str(failure(_ROOT_CAUSE_RANK_0, 1, str(tmp_path))) == (
        "RuntimeError: rank 1 failed during the start barrier: Timed out")


def test_failure_names_the_rank_that_failed_first(tmp_path):
    from attnkit.cli.ring import failure

    assert str(failure(_TORCHRUN_TAIL, 1, str(tmp_path))) == "rank 1 was killed by signal SIGKILL without reporting an error"
    (tmp_path / "rank0.txt").write_text("RuntimeError\nring attention: rank 0 lost rank 1 during forward step 1")
    assert str(failure(_TORCHRUN_TAIL, 1, str(tmp_path))) == (
        "rank 1 was killed by signal SIGKILL without reporting an error; "
        "rank 0 then saw: ring attention: rank 0 lost rank 1 during forward step 1"
    )
    (tmp_path / "rank1.txt").write_text("ValueError\nbad shard")  # the first failure's own report wins
    error = failure(_TORCHRUN_TAIL, 1, str(tmp_path))
    assert isinstance(error, ValueError) and str(error) == "bad shard"
    for name in ("rank0.txt", "rank1.txt"):
        (tmp_path / name).unlink()
    no_summary = "some output\nTraceback: worker crashed\n=======================================================\n"
    assert str(failure(no_summary, 1, str(tmp_path))) == "torchrun failed: Traceback: worker crashed"


def _workers(marker: str) -> dict[int, int]:
    """rank -> pid of the torchrun workers whose environment carries ``marker``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if marker.encode() in environ and b"attnkit.cli.ring_worker" in cmdline:
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = int(pid)
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_a_killed_worker_is_named_not_torchruns_banner():
    # Before: "torchrun failed: =====..." (the last line of torchrun's summary).
    marker = f"ATTNKIT_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    command = [sys.executable, "-m", "attnkit.cli", "ring", "--nproc", "2", "--seq", "262144", "--heads", "2",
               "--head-dim", "16", "--check", "no", "--timeout", "60"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_workers(marker)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        os.kill(_workers(marker)[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        for pid in _workers(marker).values():
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: ")
    assert "rank 1 was killed by signal SIGKILL" in lines[0]


def test_a_failed_launch_reports_its_cause_even_when_the_result_cannot_be_read(monkeypatch, capsys):
    # Before: the launcher read result.json before looking at torchrun's exit code, so a result
    # cut short by a failing launch ended the command with a JSON error instead of the cause.
    from attnkit.cli import ring
    from attnkit.distributed.ring_case import CASE_VARIABLE, RESULT_FILE

    class FailedTorchrun:
        def __init__(self, command, env, **kwargs):
            self.work_dir = json.loads(env[CASE_VARIABLE])["work_dir"]
            self.pid, self.returncode = -1, 1

        def communicate(self, timeout=None):
            with open(os.path.join(self.work_dir, "rank1.txt"), "w") as handle:
                handle.write(f"ValueError\nscale must be finite, got nan\n{time.time()!r}")
            with open(os.path.join(self.work_dir, RESULT_FILE), "w") as handle:
                handle.write('{"reports": [')
            return None, "torchrun: worker failed\n"

    monkeypatch.setattr(ring.subprocess, "Popen", FailedTorchrun)
    assert main(["ring", "--nproc", "2", "--seq", "64"]) == 2
    assert capsys.readouterr().err.strip() == "attnkit: error: scale must be finite, got nan"


def test_workers_replace_their_files_whole(tmp_path):
    from attnkit.distributed.worker import _write_whole

    path = tmp_path / "result.json"
    path.write_text("old")
    _write_whole(str(path), '{"reports": []}')
    assert path.read_text() == '{"reports": []}' and os.listdir(tmp_path) == ["result.json"]


def test_a_redirected_run_shows_each_ranks_phase_when_it_changes(tmp_path, capsys):
    from attnkit.cli import ring
    from attnkit.distributed.ring_case import phase_file

    (tmp_path / "phase0.txt").write_text("forward")
    said = iter(["backward", "backward", "done"])

    class SlowTorchrun:  # rank 1 moves on between polls; the same phases are not shown twice
        def communicate(self, timeout=None):
            phase = next(said, None)
            if phase is None:
                return None, "torchrun's stderr"
            with open(phase_file(str(tmp_path), 1), "w") as handle:
                handle.write(phase)
            raise subprocess.TimeoutExpired("torchrun", timeout)

    case = argparse.Namespace(work_dir=str(tmp_path))
    assert ring._wait_showing_phases(SlowTorchrun(), case, 3, poll_s=0) == "torchrun's stderr"
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "rank 0 forward · rank 1 backward · rank 2 starting",
        "rank 0 forward · rank 1 done · rank 2 starting",
    ]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_a_terminated_command_stops_its_workers():
    # Before: SIGTERM (``timeout``, ``kill``) ended the command alone; torchrun and the workers,
    # in sessions of their own, went on computing (gigabytes per rank at a million tokens).
    marker = f"ATTNKIT_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    command = [sys.executable, "-m", "attnkit.cli", "ring", "--nproc", "2", "--seq", "262144", "--heads", "2",
               "--head-dim", "16", "--check", "no", "--timeout", "60"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_workers(marker)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert len(_workers(marker)) == 2
        process.terminate()
        process.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while _workers(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _workers(marker) == {}
    finally:
        for pid in _workers(marker).values():
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM
