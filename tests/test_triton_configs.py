"""The launcher's tile choices against what ptxas measured for sm_90a (the static sweep's JSON),
and on a faked sm_86/sm_89 device: no configuration above 99 KiB of shared memory runs there."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from attnkit.kernels import triton_configs as configs  # noqa: E402
from attnkit.kernels import triton_mods as mods  # noqa: E402

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks/results/2026-12-07-hopper-static.json"
SMALL_SHARED = 101376  # sm_86 / sm_89: 99 KiB per block
KINDS = {"_band_fwd": "fwd", "_band_bwd_dq": "dq", "_band_bwd_dkdv": "dkdv",
         "_blocks_fwd": "blocks", "_blocks_bwd_dq": "blocks_dq", "_blocks_bwd_dkdv": "blocks_dkdv"}


def _tiles(row: dict) -> tuple[int, int, int, int]:
    """``(BM, BN, warps, stages)`` of a sweep row (a block-list kernel's block is both BM and BN)."""
    config = row["config"]
    warps, stages = (int(x) for x in re.search(r"w(\d+) s(\d+)", config).groups())
    block = re.search(r"BLK=(\d+)", config)
    if block:
        return int(block.group(1)), int(block.group(1)), warps, stages
    bm, bn = (int(x) for x in re.search(r"BM=(\d+) BN=(\d+)", config).groups())
    return bm, bn, warps, stages


def _half_precision_rows():
    """The launcher's own rows (candidates and launches, not "extra") in bf16/fp16 at D = 64, 128."""
    for row in json.loads(SWEEP.read_text()):
        if (row["kernel"] in KINDS and row["dtype"] in ("bf16", "fp16") and row["D"] in (64, 128)
                and row.get("candidate") != "extra" and "error" not in row):
            yield row


@pytest.fixture
def device_with(monkeypatch):
    """``device_with(shared)``: a CUDA device whose properties say ``shared`` bytes per block (a
    faked capability: sm_89 for 99 KiB, sm_90 for 227 KiB), compiled tiles (no interpreter)."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)

    def fake(shared: int) -> torch.device:
        major, minor = (9, 0) if shared > SMALL_SHARED else (8, 9)
        props = SimpleNamespace(shared_memory_per_block_optin=shared, major=major, minor=minor)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        return torch.device("cuda")
    return fake


def _mod(row: dict) -> int:
    """The row's score modification (its ``MOD`` constexpr; 0: none)."""
    found = re.search(r"\bMOD=(\d)", row["config"])
    return int(found.group(1)) if found else 0


def _chosen(row: dict, device: torch.device) -> set[tuple[int, int, int, int]]:
    """The tiles the launcher may run for this row's kernel, row width, dtype and score
    modification on ``device``."""
    kind, dim, mod = KINDS[row["kernel"]], row["D"], _mod(row)
    if "PACKED=True" in row["config"]:
        return {configs.decode_tiles(dim, dim, 2, device, mod)}
    q = SimpleNamespace(element_size=lambda: 2, device=device)
    block = configs.block_size(dim, dim, 2, device, mod) if kind.startswith("blocks") else 0
    kept = configs.pruner(kind)(configs.configs(kind), {"Q": q}, D=dim, DV=dim, BLK=block, MOD=mod)
    return {(c.kwargs.get("BM", block), c.kwargs.get("BN", block), c.num_warps, c.num_stages) for c in kept}


def _measured(row: dict) -> bool:
    return (row["kernel"] in KINDS and row["dtype"] in ("bf16", "fp16") and row["D"] in (64, 128)
            and "error" not in row)


def test_the_launcher_takes_no_tile_measured_spilling_or_serialised(device_with):
    # Every bf16/fp16 row the sweeps measured at head dim 64 and 128 -- the launcher's own and the
    # "extra" ones (tiles tried, not offered: e.g. the plain candidates that spill with a score
    # modification) -- plain or score-modified, one band or a part of a plan, decode, block lists:
    # a configuration the launcher may choose on sm_90 for that kernel, width and modification
    # compiled without spill and without serialised wgmma.
    sm90 = device_with(configs.SM90_SHARED)
    rows = [row for row in json.loads(SWEEP.read_text()) if _measured(row)]
    assert {_mod(row) for row in rows} == {0, 1, 2, 3}
    broken = [row for row in rows if row["spills"] or any("serialized" in w for w in row["warnings"])]
    assert broken, "the sweep keeps the tiles that failed (as extra rows): the test needs them"
    for row in broken:
        assert _tiles(row) not in _chosen(row, sm90), row


def test_plain_kernels_keep_their_candidates_and_blocks(device_with):
    # The score modifications' lists leave the plain kernels' choices alone.
    sm90 = device_with(configs.SM90_SHARED)
    for dim in (64, 128):
        row_class = configs.row_class(dim, dim, 2)
        for kind in ("fwd", "dq", "dkdv"):
            assert configs.candidates(kind, dim, dim, 2) == configs.TILES[row_class][kind]
        assert configs.block_size(dim, dim, 2, sm90) == 64
    for kind, runs in configs.BLOCKS_RUNS.items():
        assert configs.candidates(kind, 64, 64, 2, 64) == tuple((64, 64, w, s) for w, s in runs)


def test_score_modified_block_lists_take_32_blocks_where_64_spill(device_with):
    sm90 = device_with(configs.SM90_SHARED)
    assert configs.block_size(128, 128, 2, sm90, mods.SOFTCAP) == 32  # dK/dV: 48-96 spill bytes with 64
    assert configs.block_size(128, 128, 2, sm90, mods.DISTANCE) == 32  # dQ: 32-420
    assert configs.block_size(128, 128, 2, sm90, mods.ALIBI) == 64
    assert configs.block_size(64, 64, 2, sm90, mods.DISTANCE) == 64
    # distance_bias's decode at head dim 64 spilled 180 bytes with (16, 128, 4, 3)
    assert configs.decode_tiles(64, 64, 2, sm90, mods.DISTANCE) == (16, 64, 4, 2)
    assert configs.decode_tiles(64, 64, 2, sm90) == configs.decode_tiles(64, 64, 2, sm90, mods.SOFTCAP) == (16, 128, 4, 3)


def test_configurations_above_99k_are_not_chosen_on_sm86_sm89(device_with):
    # Every configuration the sweep measured above 99 KiB (the table marks them ">99K") may run on
    # sm_90 but is never chosen on a 99 KiB device; what is chosen there fits by the estimate.
    rows = list(_half_precision_rows())
    large = [row for row in rows if row["shared"] > SMALL_SHARED]
    assert len(large) >= 10, "the sweep has no rows above 99 KiB: rerun benchmarks/gpu/static_check.py"
    for row in large:
        assert _tiles(row) in _chosen(row, device_with(configs.SM90_SHARED)) or row.get("candidate") is False, row
        chosen = _chosen(row, device_with(SMALL_SHARED))
        assert _tiles(row) not in chosen, row
        kind = "fwd" if "PACKED=True" in row["config"] else KINDS[row["kernel"]]
        assert all(configs.shared_bytes(kind, t, row["D"], row["D"], 2, _mod(row)) <= SMALL_SHARED for t in chosen), row


def test_the_estimate_bounds_every_measured_half_precision_row():
    # The pruner decides with shared_bytes: it must never be below what Triton allocated, for every
    # kernel family (band parts, merges, decode, block lists), or a device could be given too much.
    rows = list(_half_precision_rows())
    assert {row["kernel"] for row in rows} == set(KINDS)
    for row in rows:
        kind = "fwd" if "PACKED=True" in row["config"] else KINDS[row["kernel"]]
        assert configs.shared_bytes(kind, _tiles(row), row["D"], row["D"], 2, _mod(row)) >= row["shared"], row


def test_decode_tiles_fit_the_device(device_with):
    assert configs.decode_tiles(128, 128, 2, device_with(configs.SM90_SHARED)) == (16, 128, 4, 3)
    sm89 = device_with(SMALL_SHARED)
    for dim in (64, 128):
        tiles = configs.decode_tiles(dim, dim, 2, sm89)
        assert tiles == (16, 64, 4, 2) and configs.shared_bytes("fwd", tiles, dim, dim, 2) <= SMALL_SHARED
    assert configs.decode_tiles(256, 256, 2, device_with(configs.SM90_SHARED)) == (16, 64, 4, 2)
    # float32 rows count tf32x3's 1.5x: (16, 128, 4, 3) would pass sm_90's 227 KiB at head dim 64
    assert configs.decode_tiles(64, 64, 4, device_with(configs.SM90_SHARED)) == (16, 64, 4, 2)


def test_every_decode_configuration_is_listed_best_first():
    for tiles in configs.DECODE.values():
        assert tiles and all(bm == 16 for bm, _, _, _ in tiles)
        needs = [configs.shared_bytes("fwd", t, 128, 128, 2) for t in tiles]
        assert needs == sorted(needs, reverse=True)
