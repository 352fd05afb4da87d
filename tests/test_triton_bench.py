"""The GPU benchmark's logic, without a GPU and without timing: sections, failures, budget, files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.bench import gpu_table
from attnkit.bench.cases import CASE_SETS, contenders_for
from attnkit.bench.gpu_cases import GPU_CASE_SETS, DecodeWorkload
from attnkit.bench.runner import BenchRow
from attnkit.patterns import SlidingWindow


def test_gpu_case_sets_are_registered_with_issue_shapes():
    assert set(GPU_CASE_SETS) <= set(CASE_SETS)
    workload = CASE_SETS["gpu-strided"]((16384,))[0]
    assert (workload.batch, workload.heads, workload.head_dim, workload.dtype) == (2, 16, 128, torch.bfloat16)
    names = [c.name for c in contenders_for(workload)]
    assert names[0].startswith("torch sdpa") and {"flex (compiled)", "attnkit auto", "attnkit triton", "attnkit sparse"} <= set(names)


def test_planner_backward_left_out_where_it_ran_out_of_memory():
    big = next(c for c in contenders_for(CASE_SETS["gpu-window4096"]((32768,))[0]) if c.name == "attnkit sparse")
    small = next(c for c in contenders_for(CASE_SETS["gpu-window"]((8192,))[0]) if c.name == "attnkit sparse")
    assert big.forward_only and not small.forward_only


def test_decode_workload_has_one_query_and_counts_its_pairs():
    workload = DecodeWorkload("gpu-decode", SlidingWindow(8), 40, batch=1, heads=2, kv_heads=2, head_dim=16)
    q, k, v = workload.inputs()
    assert q.shape == (1, 2, 1, 16) and k.shape == (1, 2, 40, 16)
    assert workload.allowed_pairs == 8 * 2


def _row(case: str, mode: str) -> BenchRow:
    return BenchRow(case, 256, "attnkit auto", mode, 1.0, 1.0, 1.0, 0.0, 0.1)


def test_failing_section_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    calls = []

    def fake(workloads, *, repeats, backward, device):
        case = workloads[0].case
        calls.append((case, backward, workloads[0].head_dim))
        if case == "gpu-strided":
            raise RuntimeError("boom")
        return [_row(case, "fwd+bwd" if backward else "fwd")]

    monkeypatch.setattr(gpu_table, "run_benchmark", fake)
    monkeypatch.setattr(gpu_table, "_window_read_ms", lambda *args: 0.5)
    result = gpu_table.run(tmp_path, "cpu", tiny=True, budget=1e9, repeats=1,
                           only=["gpu-window", "gpu-strided", "gpu-decode"])
    assert [c[0] for c in calls] == ["gpu-window", "gpu-window", "gpu-strided", "gpu-strided", "gpu-decode"]
    assert all(c[2] == 64 for c in calls)  # tiny shapes
    assert [f["section"].split()[0] for f in result["failures"]] == ["gpu-strided", "gpu-strided"]
    assert "boom" in result["failures"][0]["error"]
    written = json.loads((tmp_path / "gpu_table.json").read_text())
    assert len(written["rows"]) == 3 and written["decode_read_ms"]
    assert (tmp_path / "gpu_table.png").stat().st_size > 0


def test_budget_stops_new_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_table, "run_benchmark", lambda workloads, **kw: [_row(workloads[0].case, "fwd")])
    result = gpu_table.run(tmp_path, "cpu", tiny=True, budget=-1.0, repeats=1, only=["gpu-window"])
    assert result["rows"] == [] and len(result["skipped"]) == 2


def test_main_refuses_cuda_without_a_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_table.main(["--out", str(tmp_path)])


def test_display_failure_keeps_the_json(tmp_path, monkeypatch):
    def broken(rows, title):
        raise ValueError("cannot render")

    monkeypatch.setattr(gpu_table, "run_benchmark", lambda workloads, **kw: [_row(workloads[0].case, "fwd")])
    monkeypatch.setattr(gpu_table, "rich_table", broken)
    result = gpu_table.run(tmp_path, "cpu", tiny=True, budget=1e9, repeats=1, only=["gpu-window"])
    assert len(result["rows"]) == 2 and not result["failures"]
    assert len(json.loads((tmp_path / "gpu_table.json").read_text())["rows"]) == 2


REPO = Path(__file__).resolve().parent.parent


def test_run_bench_records_a_failing_section_and_goes_on(tmp_path):
    # python3 fails for the exactness section only: the summary must record it, the next
    # section (bench: skipped without CUDA) must still come, and the exit status must say so.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "python3"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *check_exact*) echo boom >&2; exit 3;; esac\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SECTIONS": "env exact bench", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu/run_bench.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    sections = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["sections"]}
    assert sections["env"]["status"] == "ok" and json.loads((out / "env.json").read_text())["torch"]
    assert sections["exact"]["status"] == "failed" and sections["exact"]["exit_status"] == 3
    assert "boom" in (out / "exact.log").read_text()
    expected = "ok" if torch.cuda.is_available() else "skipped"
    assert sections["bench"]["status"] in (expected, "failed")


def test_static_check_lists_launches_with_their_specialisation(tmp_path):
    # The recording step of the static check (no compile: seconds): the launcher's real launches,
    # forward and backward, plain and score-modified, with pointers and strides known divisible by
    # 16 as on a GPU.
    listing = tmp_path / "launches.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/static_check.py"), "--list", "--cases",
                    "window,decode-gqa", "--dtypes", "bf16", "--dims", "64", "--json", str(listing)],
                   env=env, check=True, capture_output=True, timeout=300)
    rows = json.loads(listing.read_text())
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_band_fwd", "_band_bwd_dq", "_band_bwd_dkdv", "_delta", "_merge_partials"}
    forward = next(row for row in rows if row["kernel"] == "_band_fwd" and "window bf16 D=64" in row["cases"])
    assert {"Q", "K", "V", "O", "LSE", "sqh", "skh"} <= set(forward["divisible_by_16"])
    decode = [row for row in rows if "decode-gqa bf16 D=64" in row["cases"] and row["kernel"] == "_band_fwd"]
    assert decode and all("PACKED=True" in row["config"] and "BM=16" in row["config"] for row in decode)
    # every case also runs with each score modification (the default): their own launches
    for mod, code in (("softcap", 1), ("alibi", 2), ("distance_bias", 3)):
        modified = [row for row in rows if f"window+{mod} bf16 D=64" in row["cases"]]
        assert {row["kernel"] for row in modified} >= {"_band_fwd", "_band_bwd_dq", "_band_bwd_dkdv"}
        assert all(f"MOD={code}" in row["config"] for row in modified if row["kernel"].startswith("_band"))


def test_static_check_acceptance_rules():
    sys.path.insert(0, str(REPO / "benchmarks/gpu"))
    try:
        from static_check import problems
    finally:
        sys.path.pop(0)
    row = {"dtype": "bf16", "D": 128, "shared": 1024, "spills": 0, "warnings": []}
    assert problems(row) == []
    assert problems({**row, "spills": 8}) == ["8 spill bytes"]
    serialised = "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized"
    assert problems({**row, "warnings": [serialised]}) == ["wgmma serialised (C7515)"]
    assert problems({**row, "warnings": [serialised.replace("C7515", "C7512")]}) == ["wgmma serialised (C7512)"]
    assert problems({**row, "dtype": "fp32", "spills": 8}) == []  # float32 is outside the acceptance
    assert problems({**row, "shared": 300000}) == ["shared 300000 > 232448"]


SWEEP = REPO / "benchmarks/results/2026-12-07-hopper-static.json"  # static_check.py rows (ptxas for sm_90a)
_BAND_KINDS = {"_band_fwd": "fwd", "_band_bwd_dq": "dq", "_band_bwd_dkdv": "dkdv"}
_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}


def _mod(row: dict) -> int:
    """A sweep row's score modification (its ``MOD`` constexpr; 0: none)."""
    found = re.search(r"\bMOD=(\d)", row["config"])
    return int(found.group(1)) if found else 0


def _measured_band_tiles():
    """``(kind, dtype, D, tiles, row)`` of every measured single-band launch (no plan part, no decode)."""
    for row in json.loads(SWEEP.read_text()):
        kind = _BAND_KINDS.get(row["kernel"])
        found = re.search(r"BM=(\d+) BN=(\d+) w(\d+) s(\d+)", row["config"])
        if kind is None or "error" in row or not found or re.search(r"(MERGE|ACC|SEGMENTED|PACKED)=True", row["config"]):
            continue
        yield kind, row["dtype"], row["D"], tuple(int(x) for x in found.groups()), row


def test_the_shared_memory_estimate_bounds_what_triton_allocated():
    from attnkit.kernels import triton_configs as configs

    rows = list(_measured_band_tiles())
    assert len(rows) > 50
    for kind, dtype, dim, tiles, row in rows:
        assert configs.shared_bytes(kind, tiles, dim, dim, _ELEMENT[dtype], _mod(row)) >= row["shared"], row


def test_the_launchers_tiles_compiled_clean_where_measured(monkeypatch):
    # Every candidate the launcher offers for a row width (and score modification), where the sweep
    # compiled it, has no spill and no serialised wgmma -- except float32 at head dim 128 and more,
    # where every tile tried spills (the lists keep the least spilling; see triton_configs).
    from attnkit.kernels import triton_configs as configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    checked = 0
    for kind, dtype, dim, tiles, row in _measured_band_tiles():
        if configs.tile_class(dim, dim, _ELEMENT[dtype]) == "single-wide":
            continue
        if tiles in configs.candidates(kind, dim, dim, _ELEMENT[dtype], mod=_mod(row)):
            checked += 1
            assert row["spills"] == 0 and not any("serialized" in w for w in row["warnings"]), row
    assert checked > 40


def test_gpu_documents_runs_its_tiny_case_on_the_cpu(tmp_path):
    # Issue 21's GPU section, its logic on this CPU: varlen and FlashAttention are CUDA-only and
    # skipped with the reason; the Triton rows (interpreter) equal the default dispatch's.
    from attnkit.bench import gpu_documents

    assert gpu_documents.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / "gpu_documents.json").read_text())
    timed = {(row["contender"], row["mode"]) for row in result["rows"]}
    assert {("attnkit auto", "fwd"), ("attnkit auto", "fwd+bwd")} <= timed
    if not torch.cuda.is_available():
        assert result["skipped"]["torch varlen"] == "CUDA only"
    for row in result["rows"]:
        assert row["median_ms"] > 0 and row["max_abs_diff_fwd"] < 1e-4, row


def test_gpu_decode_runs_its_tiny_case_on_the_cpu(tmp_path):
    # Issue 19's GPU section, its logic on this CPU: the eager contenders run on the same weights
    # and agree token for token; the CUDA-graph and compiled ones are skipped with the reason.
    pytest.importorskip("transformers")
    from attnkit.bench import gpu_decode

    assert gpu_decode.main(["--out", str(tmp_path), "--device", "cpu", "--tiny", "--tokens", "3"]) == 0
    result = json.loads((tmp_path / "gpu_decode.json").read_text())
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {"attnkit eager", "transformers eager"}
    assert "CUDA" in result["skipped"]["attnkit graph"]
    for row in rows.values():
        assert row["step_ms"] > 0 and row["floor_share"] > 0 and row["tokens"] == 1 + 2 + 3
        assert row["leading_tokens_as_first_row"] == row["tokens"], row
    assert result["meta"]["floor_step_ms"] > 0


def test_run_bench_lists_a_section_per_issue():
    # The lead runs this one script when a GPU is lent: issue 22's table, 21's documents, 19's decode,
    # each a section with its own limit, and the limits on a GPU host within the 8-minute call.
    script = (REPO / "benchmarks/gpu/run_bench.sh").read_text()
    start = script.index('if [ "$cuda" = 1 ]; then')
    cuda_branch = script[start:script.index("\nelse", start)]
    limits = {name: int(limit) for name, limit in re.findall(r"section (\w+) (\d+) ", cuda_branch)}
    assert set(limits) == {"exact", "bench", "documents", "decode"}
    assert sum(limits.values()) + 20 + 20 <= 480  # env and the static listing: 20 s each
    assert "attnkit.bench.gpu_documents" in cuda_branch and "attnkit.bench.gpu_decode" in cuda_branch
