"""The GPU benchmark's logic, without a GPU and without timing: sections, failures, budget, files."""

from __future__ import annotations

import json

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
