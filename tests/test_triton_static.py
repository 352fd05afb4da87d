"""The static check in the default suite: one launch of every kernel family compiled for sm_90a
(Triton's compiler, then the ptxas in its wheel), clean. The whole sweep (every configuration the
launcher can choose) is ``benchmarks/gpu/static_check.py``; its table is in
``benchmarks/results/2026-12-07-hopper-static.md``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ptxas_or_skip() -> None:
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 - a Triton without the NVIDIA backend or its ptxas
        pytest.skip(f"no ptxas for sm_90 in this Triton: {type(exc).__name__}: {exc}")
    if not os.access(path, os.X_OK):
        pytest.skip(f"ptxas at {path} is not executable")


def _sample(tmp_path, *options: str) -> list[dict]:
    """``static_check.py --sample`` with ``options``: its rows, after it exits 0 (the acceptance)."""
    _ptxas_or_skip()
    rows_path = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/static_check.py"), "--sample", *options,
                             "--jobs", "2", "--json", str(rows_path)],
                            env=env, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(rows_path.read_text())


def _assert_clean(rows: list[dict]) -> None:
    for row in rows:
        assert row["registers"] and row["spills"] == 0, row
        assert not any("serialized" in w for w in row["warnings"]), row
        assert row["shared"] <= 232448, row


def test_one_launch_of_every_kernel_family_compiles_clean_for_sm90a(tmp_path):
    # Window (band forward, dQ, dK/dV, delta), Fixed (a part merging into the previous parts),
    # documents (the block-list kernels), GQA decode (packed heads, the split merge): bf16, D=64.
    rows = _sample(tmp_path, "--cases", "window,fixed,documents,decode-gqa", "--dtypes", "bf16", "--dims", "64",
                   "--score-mods", "none")
    assert {row["kernel"] for row in rows} == {"_band_fwd", "_band_bwd_dq", "_band_bwd_dkdv", "_delta",
                                               "_blocks_fwd", "_blocks_bwd_dq", "_blocks_bwd_dkdv",
                                               "_merge_partials"}
    configs = [row["config"] for row in rows if row["kernel"] == "_band_fwd"]
    assert any("PACKED=True" in c for c in configs) and any("MERGE=True" in c for c in configs)
    _assert_clean(rows)


def test_score_modified_kernels_that_spilled_compile_clean_for_sm90a(tmp_path):
    # The first candidate the launcher keeps, bf16 at D=128, of the families that spilled with a
    # modification on the plain lists: distance_bias's band forward (152 spill bytes) and dQ
    # (332) and block-list dQ (32), softcap's block-list dK/dV (48), softcap's band dQ.
    rows = _sample(tmp_path, "--cases", "window,documents", "--dtypes", "bf16", "--dims", "128",
                   "--score-mods", "softcap,distance_bias",
                   "--kernels", "_band_fwd,_band_bwd_dq,_blocks_bwd_dq,_blocks_bwd_dkdv")
    assert {(row["kernel"], "MOD=3" in row["config"]) for row in rows} == {
        (kernel, distance) for kernel in ("_band_fwd", "_band_bwd_dq", "_blocks_bwd_dq", "_blocks_bwd_dkdv")
        for distance in (False, True)}
    _assert_clean(rows)
