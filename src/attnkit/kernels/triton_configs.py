"""Tile configurations of the Triton kernels, their autotune candidates, and how they are launched.

Each kernel kind has a short list of candidates (``(BM, BN, warps, stages)``) per row width (and,
where the plain list spills with it, per score modification: :data:`MOD_TILES`), the Triton
tutorial's shapes among them (FlexAttention's ``(64, 128, 8, 3)`` spills on sm_90a, see
below); ``@triton.autotune`` times those that fit the call (row width and the device's shared
memory, :func:`pruner`) once per shape and caches its choice. Under a CUDA-graph capture nothing is timed (:func:`launch`): a shape seen
before keeps its choice, a new one takes the first candidate that fits, so warm up (run each shape
once) before capturing. In the interpreter every kernel has one small configuration (16 x 16
tiles: more edge cases per test, less numpy work).

Shared memory: :func:`shared_bytes` estimates a candidate's need (the pipelined K/V or Q/dO
tiles plus the resident ones); ``benchmarks/gpu/static_check.py`` compares it with what Triton
allocates for sm_90. Candidates above 99 KiB cannot run on sm_86/sm_89 cards (their per-block
limit) and are pruned there; sm_90 allows 227 KiB.

Grids: CUDA limits grid axes 1 and 2 to 65,535 programs. :func:`grid` folds a logical
``(n0, n1, n2)`` grid into one axis when axis 1 or 2 would exceed :data:`GRID_LIMIT`, and the
kernels unfold it (:func:`~attnkit.kernels.triton_tiles.program_coords`).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
from triton.runtime.autotuner import Autotuner

from .triton_mods import ALIBI, DISTANCE, NONE, SOFTCAP

GRID_LIMIT = 65535
"""CUDA's limit on grid axes 1 and 2 (tests lower it to exercise folding)."""
MAX_PROGRAMS = 2**31 - 1
"""CUDA's limit on grid axis 0, which a folded grid uses alone."""
SM90_SHARED = 232448
"""Shared memory per block on sm_90 (227 KiB): the limit for CPU tensors (interpreter, static check)."""

# (BM, BN, warps, stages), by the width of a row (head dim x element size): "compact" rows hold
# at most 128 bytes (head dim 64 in half precision), "narrow" ones 256 (128), "wide" ones more
# (256), which take smaller tiles so they fit shared memory and registers. Float32 rows have their
# own lists ("single" up to 256 bytes, head dim 64; "single-wide" beyond): their dots take three
# TF32 products each (tf32x3), whose split operands hold more registers. Every list holds only
# configurations that ptxas compiled for sm_90a without spills or serialised wgmma
# (benchmarks/gpu/static_check.py; benchmarks/results/2026-12-07-triton.md and
# 2026-12-07-hopper-static.md) where one exists: (128, 128, 8, 3) spills at head dim 128, so only
# compact rows take it; FlexAttention's (64, 128, 8, 3) spills at 128 (88 bytes; 56 with 2
# stages, 540 with 4 warps) and, at 64, in Fixed's segmented part, so it is no candidate; at 128
# the backward keeps 64-key tiles (128 spill in the parts of a multi-part plan) and the dK/dV pass
# 32-query tiles (64 or more spill or serialise). At head dim 256 only 32-query tiles compile
# clean (64-query ones spill 280-8352 bytes: the 64 x 256 float32 accumulator alone takes 128
# registers a thread in one warp group). Float32 at head dim 128 spills in every tile tried (96-116
# bytes at best forward and dQ, 1104 dK/dV, against 1196-9780 on the wide lists it took before).
COMPACT = {
    "fwd": ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 3)),
    "dq": ((64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2)),
    "dkdv": ((32, 64, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
}
NARROW = {
    "fwd": ((128, 64, 8, 3), (64, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 2)),
    "dq": ((64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)),
    "dkdv": ((32, 64, 8, 2), (32, 32, 4, 2)),
}
WIDE = {
    "fwd": ((32, 64, 4, 2),),
    "dq": ((32, 64, 8, 2), (32, 32, 4, 2)),
    "dkdv": ((32, 32, 8, 2),),
}
SINGLE = {
    "fwd": ((64, 32, 8, 2), (32, 32, 4, 2)),
    "dq": ((64, 32, 8, 2),),
    "dkdv": ((32, 32, 8, 2),),
}
SINGLE_WIDE = {  # every tile tried spills here (tf32x3 at head dim 128): these spill least
    "fwd": ((32, 32, 4, 2),),
    "dq": ((32, 32, 8, 2),),
    "dkdv": ((32, 32, 8, 2),),
}
TILES = {"compact": COMPACT, "narrow": NARROW, "wide": WIDE, "single": SINGLE, "single-wide": SINGLE_WIDE}
# A score modification (``MOD``, triton_mods) adds registers: the tanh and its derivative (softcap),
# the offset tile (alibi), the gathered table entries and the table's gradient (distance_bias, the
# dQ pass). For half-precision rows each modification has its own lists where a plain candidate
# spilled or serialised with it, or came within a few registers of 255 in the one-part band (the
# parts of multi-part plans, Strided's and Fixed's, take up to ~70 more): the plain candidates
# that stay clean with room, and smaller tiles (more warps per tile, 32-row or 32-key tiles) in
# place of the others (benchmarks/results/2026-12-07-hopper-static.md, "third session").
MOD_TILES = {
    SOFTCAP: {
        "compact": {"fwd": ((128, 64, 8, 3), (64, 64, 8, 3)), "dq": ((64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2)),
                    "dkdv": ((32, 64, 8, 2), (32, 128, 8, 2))},
        "narrow": {"fwd": ((64, 64, 8, 3), (64, 32, 8, 2)), "dq": ((64, 32, 8, 2),),
                   "dkdv": ((32, 32, 8, 2),)},
    },
    ALIBI: {
        "compact": {"fwd": ((128, 64, 8, 3), (64, 64, 8, 3)), "dq": ((64, 32, 8, 2), (64, 32, 4, 2)),
                    "dkdv": ((32, 64, 8, 2), (32, 128, 8, 2), (32, 32, 4, 2))},
        "narrow": {"fwd": ((64, 64, 8, 3), (64, 32, 8, 2)), "dq": ((64, 32, 8, 2),), "dkdv": ((32, 32, 8, 2),)},
    },
    DISTANCE: {
        "compact": {"fwd": ((128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 2)),
                    "dq": ((64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)),
                    "dkdv": ((32, 32, 4, 2),)},  # 64 and 128 keys serialise in Fixed's summary part
        "narrow": {"fwd": ((64, 32, 8, 2), (32, 32, 4, 2)), "dq": ((32, 64, 8, 2), (32, 32, 4, 2)),
                   "dkdv": ((32, 32, 8, 2),)},
    },
}
BLOCKS = (64, 32)
"""Block sizes of the block-list kernels, largest first: a call takes the largest whose every
candidate fits the device's shared memory (fixed per call: the lists are built for it)."""
BLOCKS_RUNS = {"blocks": ((4, 2), (4, 3), (8, 2)), "blocks_dq": ((4, 2), (4, 3), (8, 2)),
               "blocks_dkdv": ((8, 2), (8, 3))}
"""The block-list kernels' candidates, (warps, stages): forward, dQ, dK/dV (with 4 warps it
spills at head dim 128)."""
MOD_BLOCKS = {SOFTCAP: {"narrow": 32}, DISTANCE: {"narrow": 32}}
"""The largest block a score-modified block-list call takes, by row class, where 64-blocks spill:
softcap's dK/dV (48-96 bytes at head dim 128), distance_bias's dQ (32-420)."""
MOD_BLOCKS_RUNS = {DISTANCE: {"compact": {"blocks_dq": ((8, 2),)}}}
"""Block-list candidates of a score-modified call replacing :data:`BLOCKS_RUNS`' (by row class):
distance_bias's dQ spills with 4 warps at head dim 64 (88 bytes)."""
_SCRATCH = 4096
"""Shared memory Triton adds to the tiles (layout conversions, reductions), in the estimate."""
DECODE = {"narrow": ((16, 128, 4, 3), (16, 64, 4, 2)), "wide": ((16, 64, 4, 2),)}
"""The decode configurations, by row class, best first: a 16-row query tile (a GQA group's heads
packed into it), wide key tiles; a call takes the first that fits the device's shared memory
(:func:`decode_tiles`): (16, 128, 4, 3) allocated 136 KiB at head dim 128 on sm_90 (70 at 64; the
estimate says 208 and 110), more than sm_86/sm_89's 99 KiB."""
MOD_DECODE = {DISTANCE: {"compact": ((16, 64, 4, 2),)}}
"""Decode configurations of a score-modified call replacing :data:`DECODE`'s (by row class):
distance_bias spilled 180 bytes with (16, 128, 4, 3) at head dim 64 (Strided's residue parts)."""
INTERPRETER = (16, 16, 1, 1)


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def row_class(head_dim: int, value_dim: int, element_size: int) -> str:
    """"compact" (rows of at most 128 bytes), "narrow" (256) or "wide": which tiles a call takes."""
    row_bytes = max(head_dim, value_dim) * element_size
    return "compact" if row_bytes <= 128 else "narrow" if row_bytes <= 256 else "wide"


def tile_class(head_dim: int, value_dim: int, element_size: int) -> str:
    """Which list of :data:`TILES` a call takes: :func:`row_class`, or for float32 rows "single"
    (at most 256 bytes) or "single-wide"."""
    if element_size == 4:
        return "single" if max(head_dim, value_dim) * element_size <= 256 else "single-wide"
    return row_class(head_dim, value_dim, element_size)


def pow2(n: int) -> int:
    """The padded tile width of a head dim (a power of two, at least 16: ``tl.dot``'s minimum)."""
    return max(16, 1 << (n - 1).bit_length())


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``: float16/bfloat16 products are exact on
    tensor cores ("tf32" leaves them alone); float32 takes three TF32 products per product
    ("tf32x3": about float32 FMA's error on tensor cores, where one TF32 product would round the
    inputs to 10 mantissa bits). The interpreter's bfloat16 dot is wrong, so there bfloat16 is
    upcast (its products are exact in float32)."""
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def kernel_dims(q: torch.Tensor, v: torch.Tensor) -> dict:
    """The head-dim constexprs every kernel takes: ``D, DV`` and their tile widths, and the precision."""
    d, dv = q.shape[-1], v.shape[-1]
    return dict(D=d, DV=dv, BD=pow2(d), BDV=pow2(dv), PRECISION=precision(q.dtype))


def shared_bytes(kind: str, tiles: tuple[int, int, int, int], head_dim: int, value_dim: int,
                 element_size: int, mod: int = NONE) -> int:
    """Estimated shared memory of one program: pipelined tiles times stages plus resident tiles
    (an upper bound of what Triton allocated for sm_90 in every configuration static_check compiled;
    float32's tf32x3 lowering allocated up to 1.45 times the tiles' bytes, so it counts 1.5;
    distance_bias's gathered bias took up to 3.9 more bytes per score, so it counts 4)."""
    bm, bn, _, stages = tiles
    d, dv = pow2(head_dim), pow2(value_dim)
    if kind in ("fwd", "blocks"):  # resident q; K and V streamed
        need = element_size * (bm * d + stages * bn * (d + dv)) + 4 * bm * bn + _SCRATCH
    elif kind in ("dq", "blocks_dq"):  # resident q, dO; K and V streamed
        need = element_size * (bm * (d + dv) + stages * bn * (d + dv)) + 4 * bm * bn + _SCRATCH
    else:  # dK/dV: resident k, v; Q, dO and the row statistics streamed
        need = element_size * (bn * (d + dv) + stages * bm * (d + dv)) + 8 * stages * bm + _SCRATCH
    if mod == DISTANCE:
        need += 4 * bm * bn
    return need * 3 // 2 if element_size == 4 else need


def candidates(kind: str, head_dim: int, value_dim: int, element_size: int, block: int = 0, mod: int = NONE) -> tuple:
    """The autotune candidates ``(BM, BN, warps, stages)`` of a kernel kind for rows of this width
    (``block``: the block-list kernels' block size) with score modification ``mod`` (a ``MOD``
    code: :data:`MOD_TILES`, :data:`MOD_BLOCKS_RUNS`; plain kernels take :data:`TILES`)."""
    if interpreting():
        return (INTERPRETER,)
    row = tile_class(head_dim, value_dim, element_size)
    if kind in BLOCKS_RUNS:
        runs = MOD_BLOCKS_RUNS.get(mod, {}).get(row, {}).get(kind, BLOCKS_RUNS[kind])
        return tuple((block, block, warps, stages) for warps, stages in runs)
    return MOD_TILES.get(mod, {}).get(row, {}).get(kind, TILES[row][kind])


def block_size(head_dim: int, value_dim: int, element_size: int, device: torch.device, mod: int = NONE) -> int:
    """The block size of the block-list kernels for rows of this width on ``device`` with score
    modification ``mod``: the largest of :data:`BLOCKS` (at most :data:`MOD_BLOCKS`' cap) whose
    every candidate fits its shared memory (64 on sm_90 up to head dim 128 in half precision; 32
    on sm_86/sm_89 there, for wide rows, and for softcap and distance_bias at head dim 128)."""
    if interpreting():
        return INTERPRETER[0]
    limit = shared_limit(device)
    cap = MOD_BLOCKS.get(mod, {}).get(tile_class(head_dim, value_dim, element_size), BLOCKS[0])
    for block in (b for b in BLOCKS if b <= cap):
        needs = [shared_bytes(kind, tiles, head_dim, value_dim, element_size, mod) for kind in BLOCKS_RUNS
                 for tiles in candidates(kind, head_dim, value_dim, element_size, block, mod)]
        if max(needs) <= limit:
            return block
    return BLOCKS[-1]


def decode_tiles(head_dim: int, value_dim: int, element_size: int, device: torch.device,
                 mod: int = NONE) -> tuple[int, int, int, int]:
    """``(BM, BN, warps, stages)`` of the decode configuration for rows of this width on ``device``
    with score modification ``mod``: the first of :data:`DECODE`'s (or :data:`MOD_DECODE`'s) list
    for the row class that fits its shared memory (the last, the smallest, when none does)."""
    if interpreting():
        return INTERPRETER
    row = row_class(head_dim, value_dim, element_size)
    listed = MOD_DECODE.get(mod, {}).get(row) or DECODE["wide" if row == "wide" else "narrow"]
    limit = shared_limit(device)
    fits = [t for t in listed if shared_bytes("fwd", t, head_dim, value_dim, element_size, mod) <= limit]
    return (fits or listed[-1:])[0]


def configs(kind: str) -> list[triton.Config]:
    """Every candidate of ``kind`` as Triton configs (every row width alike; :func:`pruner`
    keeps the ones that fit a call). The block-list kernels take their block size from the
    launcher (their lists are built for it): their candidates are warps and stages only."""
    if interpreting():
        return [triton.Config({} if kind in BLOCKS_RUNS else {"BM": 16, "BN": 16}, num_warps=1, num_stages=1)]
    if kind in BLOCKS_RUNS:
        return [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in BLOCKS_RUNS[kind]]
    listed = [*TILES.values(), *(lists for by_row in MOD_TILES.values() for lists in by_row.values())]
    tiles = dict.fromkeys(tile for lists in listed for tile in lists.get(kind, ()))
    return [triton.Config({"BM": bm, "BN": bn}, num_warps=warps, num_stages=stages) for bm, bn, warps, stages in tiles]


def shared_limit(device: torch.device) -> int:
    """Shared memory one block may use on ``device`` (sm_90's for CPU tensors)."""
    if device.type != "cuda":
        return SM90_SHARED
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _tiles(config: triton.Config, block: int) -> tuple[int, int, int, int]:
    kw = config.kwargs
    return kw.get("BM", block), kw.get("BN", block), config.num_warps, config.num_stages


def pruner(kind: str) -> Callable:
    """``early_config_prune`` for ``kind``: the candidates for the call's row width and score
    modification that fit the device's shared memory (at least the last of them, the smallest)."""
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        q = named_args["Q"]
        head_dim, value_dim, block = kwargs["D"], kwargs["DV"], kwargs.get("BLK", 0)
        mod = kwargs.get("MOD", NONE)
        wanted = candidates(kind, head_dim, value_dim, q.element_size(), block, mod)
        fitting = [c for c in configs if _tiles(c, block) in wanted]
        limit = shared_limit(q.device)
        small = [c for c in fitting
                 if shared_bytes(kind, _tiles(c, block), head_dim, value_dim, q.element_size(), mod) <= limit]
        return small or fitting[-1:]
    return prune


def autotuned(kind: str, key: list[str]) -> Callable:
    """``@triton.autotune`` over the candidates of ``kind``, keyed by ``key`` (and the dtypes)."""
    return triton.autotune(configs=configs(kind), key=key, prune_configs_by={"early_config_prune": pruner(kind)})


def grid(n_rows: int, n1: int, n2: int, block: str = "BM") -> tuple[Callable, bool]:
    """``(grid, folded)`` for a logical grid of ``cdiv(n_rows, META[block])`` x ``n1`` x ``n2``
    programs: 3-D while axes 1 and 2 fit :data:`GRID_LIMIT`, else folded into axis 0. Raises
    ValueError when even one axis cannot hold the programs."""
    folded = max(n1, n2) > GRID_LIMIT

    def shape(meta: dict) -> tuple[int, ...]:
        n0 = triton.cdiv(n_rows, meta[block])
        if not folded:
            return n0, n1, n2
        if n0 * n1 * n2 > MAX_PROGRAMS:
            raise ValueError(f"the Triton kernels cannot launch {n0 * n1 * n2} programs (more than {MAX_PROGRAMS})")
        return (n0 * n1 * n2,)

    return shape, folded


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _tuning_key(tuner: Autotuner, args: tuple, kwargs: dict) -> tuple:
    """The key under which ``tuner`` caches its choice for these arguments (as ``Autotuner.run``)."""
    named = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def launch(kernel, shape: Callable, *args, **kwargs) -> None:
    """Launch a (possibly autotuned) kernel on grid ``shape``. During a CUDA-graph capture an
    autotuned kernel is not timed: it runs its cached choice for this shape, else the first
    candidate that fits."""
    if isinstance(kernel, Autotuner) and _capturing():
        config = kernel.cache.get(_tuning_key(kernel, args, kwargs))
        if config is None:
            named = dict(zip(kernel.arg_names, args))
            config = kernel.early_config_prune(kernel.configs, named, **kwargs)[0]
        kernel.fn[shape](*args, **kwargs, **config.all_kwargs())
        return
    kernel[shape](*args, **kwargs)
