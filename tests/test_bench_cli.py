"""``attnkit bench`` as a new user meets it: the install hint, piped output, progress, ``--quick``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attnkit.bench import peers, sparse_cases
from attnkit.cli import bench as command
from attnkit.cli import build_parser, main


@pytest.fixture
def no_peers(monkeypatch):
    """local-attention not installed, FlexAttention left out (compiling it takes many seconds)."""
    monkeypatch.setitem(sys.modules, "local_attention", None)
    monkeypatch.setattr(sparse_cases, "flex", lambda pattern: (None, "left out by this test"))


def test_install_hint_keeps_its_extra_in_the_terminal_table(no_peers, monkeypatch, capsys):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich draws its table, as on a terminal
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "260")
    assert main(["bench", "--case", "window", "--seq", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "┏━" in out and "contender" in out  # the rich table, not the plain one
    assert 'local-attention is not installed (pip install "attnkit[bench]")' in out


def test_install_hint_keeps_its_extra_when_piped(no_peers, capsys):
    assert main(["bench", "--case", "window", "--seq", "64", "--repeats", "1"]) == 0
    assert 'skipped: local-attention is not installed (pip install "attnkit[bench]")' in capsys.readouterr().out


def test_piped_output_keeps_every_cell_whole_and_shows_progress():
    env = dict(os.environ, COLUMNS="80")
    env.pop("FORCE_COLOR", None)
    result = subprocess.run([sys.executable, "-m", "attnkit.cli", "bench", "--seq", "64", "--repeats", "1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("attnkit bench (fwd, ")
    assert lines[1].split() == ["case", "N", "contender", "median", "ms", "GFLOP/s", "ratio", "max", "|err|",
                                "largest", "MiB", "peak", "MiB", "note"]
    assert "…" not in result.stdout
    rows = [line for line in lines[3:] if line.startswith("causal")]
    assert [" ".join(row.split()[2:4]) for row in rows] == [
        "torch sdpa", "attnkit auto", "attnkit dense", "attnkit blockwise", "attnkit reference"]
    for row in rows:  # every number printed in full: the ratio, and an error in scientific notation
        assert row.split()[6].endswith("x") and "e-" in row.split()[7]
    progress = result.stderr.splitlines()
    assert progress[0].startswith("[1/11") and progress[0].endswith("causal N=64: first call of torch sdpa")
    assert any("causal N=64: timing 5 contenders, 1 rounds" in line for line in progress)
    assert progress[-1].startswith("[11/11") and "checking attnkit reference" in progress[-1]


def test_quick_runs_each_sparse_case_once_at_a_short_length():
    args = build_parser().parse_args(["bench", "--case", "window", "--case", "strided", "--case", "fixed",
                                      "--case", "blocksparse", "--quick"])
    cases, seqs, repeats = command._check(args)
    assert cases == ["window", "strided", "fixed", "blocksparse"] and repeats == 3
    assert seqs == {case: (512,) for case in cases}
    causal = command._check(build_parser().parse_args(["bench", "--quick"]))[1]
    assert causal == {"causal": (256, 1024)}
    explicit = command._check(build_parser().parse_args(["bench", "--case", "fixed", "--seq", "96", "--quick"]))[1]
    assert explicit == {"fixed": (96,)}


def test_flex_is_compiled_once_and_small_block_masks_are_not_compiled(monkeypatch):
    flex_attention = pytest.importorskip("torch.nn.attention.flex_attention")
    import torch

    from attnkit import SlidingWindow, Strided

    assert peers.compiled_flex() is peers.compiled_flex()
    compiled_flags = []

    def create_block_mask(*args, _compile=False, **kwargs):
        compiled_flags.append(_compile)
        return "mask"

    calls = []
    monkeypatch.setattr(flex_attention, "create_block_mask", create_block_mask)
    monkeypatch.setattr(peers, "compiled_flex", lambda: lambda *args, **kwargs: calls.append(kwargs))
    q = torch.zeros(1, 1, 512, 16)
    for pattern in (SlidingWindow(8), Strided(4)):
        peers.flex(pattern)[0](q, q, q)
    assert compiled_flags == [False, False] and [c["block_mask"] for c in calls] == ["mask", "mask"]


def test_attnkit_contenders_come_from_the_backend_registry(monkeypatch):
    from attnkit import Causal, SlidingWindow
    from attnkit.bench import contenders
    from attnkit.bench.cases import CASE_SETS, contenders_for
    from attnkit.bench.workload import Workload

    monkeypatch.setattr(contenders, "BACKENDS", ("auto", "reference", "dense", "blockwise", "sparse", "triton", "new"))
    causal = [c.name for c in contenders_for(Workload("causal", Causal(), 64))]
    assert causal == ["torch sdpa", "attnkit auto", "attnkit dense", "attnkit blockwise", "attnkit new",
                      "attnkit reference"]
    window = [c.name for c in contenders_for(Workload("window", SlidingWindow(8), 64))]
    assert window[:5] == ["torch sdpa (masked)", "attnkit auto", "attnkit sparse", "attnkit blockwise", "attnkit new"]
    gpu = [c.name for c in contenders_for(CASE_SETS["gpu-window"]((256,))[0])]
    assert gpu == ["torch sdpa (masked)", "flex (compiled)", "attnkit auto", "attnkit triton", "attnkit sparse",
                   "attnkit new"]


def test_each_case_set_leads_with_the_backends_it_is_about():
    from attnkit.bench.contenders import backends_to_time

    assert backends_to_time(("triton",)) == ["auto", "dense", "blockwise", "sparse", "reference"]
    assert backends_to_time(("triton",), first=("sparse", "auto")) == [
        "sparse", "auto", "dense", "blockwise", "reference"]
    assert backends_to_time(("sparse",), first=("auto", "sparse")) == [
        "auto", "dense", "blockwise", "triton", "reference"]  # a left-out name stays out


def test_a_backend_that_cannot_run_is_skipped_and_the_run_goes_on(monkeypatch, capsys):
    from attnkit import Causal
    from attnkit.bench import cases, contenders
    from attnkit.bench.runner import count_steps, run_benchmark
    from attnkit.bench.workload import Workload

    def attnkit_backend(pattern, backend):
        if backend != "broken":
            return contenders.attnkit_backend(pattern, backend)

        def refuse(q, k, v):
            raise RuntimeError(f"backend 'broken' cannot run {q.dtype} on {q.device}\nmore detail")
        return refuse

    monkeypatch.setattr(contenders, "BACKENDS", ("auto", "reference", "dense", "broken", "blockwise", "sparse",
                                                 "triton"))
    monkeypatch.setattr(cases, "attnkit_backend", attnkit_backend)
    workloads = [Workload("causal", Causal(), 64), Workload("causal", Causal(), 32)]
    steps = []
    rows = run_benchmark(workloads, repeats=1, on_step=steps.append)
    assert len(steps) == count_steps(workloads)  # the progress bar still ends full
    assert "causal N=64: attnkit broken cannot run here, skipped" in steps
    broken = [r for r in rows if r.contender == "attnkit broken"]
    assert [r.note for r in broken] == ["skipped: backend 'broken' cannot run torch.float32 on cpu"] * 2
    others = [r for r in rows if r.contender != "attnkit broken"]
    assert len(others) == 2 * 5 and all(r.median_ms > 0 and r.max_abs_err < 1e-5 for r in others)

    assert main(["bench", "--seq", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "skipped: backend 'broken' cannot run torch.float32 on cpu" in out and "attnkit blockwise" in out


def test_skipped_rows_show_empty_cells_not_nan_and_the_title_names_the_window(no_peers, capsys):
    assert main(["bench", "--case", "window", "--seq", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "window: SlidingWindow(size=256)" in out.splitlines()[0]
    skipped = next(line for line in out.splitlines() if "skipped: local-attention is not installed" in line)
    assert "nan" not in out and skipped.split()[:4] == ["window", "64", "local-attention", "skipped:"]
