"""Compile every Triton kernel of attnkit for a CUDA target without a GPU (Triton's own compiler
and bundled ptxas), in each tile configuration the launchers use, and check that its shared memory
fits the target. Catches frontend errors the CPU interpreter does not (it runs Python, not MLIR).

    PYTHONPATH=src python benchmarks/gpu/compile_check.py [--arch 90] [--shared-limit 232448]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # compile for real, even when the caller interprets

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnkit.kernels import triton_band, triton_blocks  # noqa: E402

_POINTERS = {"LSE": "fp32", "DELTA": "fp32", "DQ": "fp32", "DK": "fp32", "DV_OUT": "fp32", "MASKS": "i8",
             **{name: "i32" for name in ("KV_INDEX", "KV_MASK", "KV_COUNT", "Q_INDEX", "Q_MASK", "Q_COUNT")}}


def _signature(fn, dtype: str, consts: dict, out_dtype: str) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*" + _POINTERS[name]
        elif name in ("Q", "K", "V", "DO"):
            signature[name] = "*" + dtype
        elif name == "O":
            signature[name] = "*" + out_dtype
        elif name.startswith("scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _compile(fn, dtype: str, consts: dict, warps: int, stages: int, arch: int, out_dtype: str = ""):
    source = ASTSource(fn=fn, signature=_signature(fn, dtype, consts, out_dtype or dtype),
                       constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def configurations():
    """(label, kernel, dtype, constexprs, warps, stages, out dtype) for each launch the launchers make."""
    for dtype, size, dim in (("bf16", 2, 128), ("fp16", 2, 256), ("fp32", 4, 128)):
        precision = "ieee" if dtype == "fp32" else "tf32"
        dims = dict(D=dim, DV=dim, BD=dim, BDV=dim, PRECISION=precision)
        bm, bn, warps, stages = triton_band.block_sizes(dim, dim, False, size)
        for keys, segmented in ((0, False), (1, False), (0, True)):
            band = dict(dims, KEYS=keys, SEGMENTED=segmented)
            yield f"band fwd {dtype} D={dim} keys={keys} seg={segmented}", triton_band._band_fwd, dtype, \
                dict(band, BM=bm, BN=bn, SPLITS=1), warps, stages, dtype
        yield f"band fwd split {dtype} D={dim}", triton_band._band_fwd, dtype, \
            dict(dims, KEYS=0, SEGMENTED=False, BM=bm, BN=bn, SPLITS=8), warps, stages, "fp32"
        bm, bn, warps, stages = triton_band.block_sizes(dim, dim, True, size)
        for keys, segmented in ((0, False), (1, False), (0, True)):
            band = dict(dims, KEYS=keys, SEGMENTED=segmented, BM=bm, BN=bn)
            yield f"band dq {dtype} D={dim} keys={keys}", triton_band._band_bwd_dq, dtype, band, warps, stages, ""
            yield f"band dkdv {dtype} D={dim} keys={keys}", triton_band._band_bwd_dkdv, dtype, band, warps, stages, ""
        blocks = dict(dims, BLK=bm)
        for name, fn in (("fwd", triton_blocks._blocks_fwd), ("dq", triton_blocks._blocks_bwd_dq),
                         ("dkdv", triton_blocks._blocks_bwd_dkdv)):
            yield f"blocks {name} {dtype} D={dim}", fn, dtype, blocks, warps, stages, dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--shared-limit", type=int, default=232448, help="bytes per block (sm_90: 227 KiB)")
    args = parser.parse_args()
    failed = 0
    for label, fn, dtype, consts, warps, stages, out_dtype in configurations():
        try:
            shared = _compile(fn, dtype, consts, warps, stages, args.arch, out_dtype).metadata.shared
            ok = shared <= args.shared_limit
            print(f"{'ok  ' if ok else 'FAIL'} {label}: shared {shared} bytes", flush=True)
        except Exception as exc:  # report every configuration, not only the first failure
            ok = False
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
        failed += not ok
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
