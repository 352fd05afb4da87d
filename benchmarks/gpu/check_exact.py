"""Exactness of ``attention(backend="triton")`` on a CUDA device, before any timing.

The default test suite checks the same kernels in Triton's CPU interpreter; this runs them
compiled, on the GPU, at sizes with several blocks per axis: out, LSE, dq, dk, dv against float64
reference attention, for every pattern family, GQA, ``Nq != Nk`` (both ways) and a decoding step,
in float32 (TF32 off) and bfloat16. Prints one line per case and writes JSON.

    PYTHONPATH=src python3 benchmarks/gpu/check_exact.py --json OUT.json
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/gpu/check_exact.py --device cpu --shrink 10
      (the script's own check, in the interpreter at a tenth of the lengths; --cases and --dtypes
      pick a subset)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from attnkit import BlockSparse, Fixed, PerHead, SlidingWindow, Strided, attention
from attnkit.bench.sparse_cases import bigbird_layout
from attnkit.kernels.reference import reference_kernel

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def _cases():
    yield "window 255", SlidingWindow(255), 700, 700, (8, 2), 128
    yield "window symmetric", SlidingWindow(100, causal=False), 500, 640, (4, 4), 64
    yield "strided 64", Strided(64), 1000, 1000, (4, 1), 128
    yield "fixed 64/8", Fixed(64, 8), 900, 900, (4, 2), 96
    yield "blocksparse", BlockSparse(bigbird_layout(8), 128), 1000, 1000, (4, 4), 128
    yield "union", SlidingWindow(64) | Strided(100), 600, 600, (4, 2), 64
    yield "per-head", PerHead((SlidingWindow(30), Strided(40), Fixed(32, 4), SlidingWindow(200))), 400, 400, (4, 2), 256
    yield "decode window 4096", SlidingWindow(4096), 3, 9000, (8, 8), 128
    yield "more queries than keys", SlidingWindow(50), 300, 200, (2, 2), 32


def check(name, pattern, n_q, n_k, heads, dim, dtype, device: str = "cuda", shrink: int = 1) -> dict:
    if shrink > 1:  # keep layouts valid: a BlockSparse layout is made for its length
        n_q, n_k = max(1, n_q // shrink), n_k // shrink
        if isinstance(pattern, BlockSparse):
            pattern = BlockSparse(bigbird_layout(-(-n_k // 16)), 16)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, heads[0], n_q, dim, generator=gen).to(dtype)
    k = torch.randn(2, heads[1], n_k, dim, generator=gen).to(dtype)
    v = torch.randn(2, heads[1], n_k, dim, generator=gen).to(dtype)
    grad = torch.randn(2, heads[0], n_q, dim, generator=gen, dtype=torch.float64)
    exact = [t.to(device).double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse, _ = reference_kernel(*exact, pattern, dim ** -0.5)
    ref_grads = torch.autograd.grad((ref_out * grad.to(device)).sum(), exact)
    ours = [t.to(device).requires_grad_() for t in (q, k, v)]
    start = time.perf_counter()
    out, lse = attention(*ours, pattern, backend="triton", return_lse=True)
    grads = torch.autograd.grad((out.double() * grad.to(device)).sum(), ours)
    if device == "cuda":
        torch.cuda.synchronize()
    seen = torch.isfinite(ref_lse)
    errors = {
        "out": float((out.detach().double() - ref_out.detach()).abs().max()),
        "lse": float((lse.detach().double() - ref_lse.detach())[seen].abs().max()) if seen.any() else 0.0,
        **{f"d{n}": float((g.double() - r).abs().max() / max(1.0, float(r.abs().max()))) for n, g, r in zip("qkv", grads, ref_grads)},
    }
    empty_ok = bool(torch.equal(torch.isfinite(lse), seen)) and not out[~seen].any()
    ok = empty_ok and max(errors.values()) <= TOLERANCE[dtype]
    return {"case": name, "dtype": str(dtype), "errors": errors, "empty_rows_ok": empty_ok, "ok": ok,
            "seconds_incl_compile": round(time.perf_counter() - start, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shrink", type=int, default=1, help="divide every length by this")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtype names")
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    known = [case[0] for case in _cases()]
    wanted = args.cases.split(",") if args.cases else known
    if set(wanted) - set(known):
        parser.error(f"--cases: unknown {sorted(set(wanted) - set(known))}; known: {known}")
    if set(args.dtypes.split(",")) - {"bfloat16", "float32"}:
        parser.error(f"--dtypes: bfloat16 and float32 only, got {args.dtypes!r}")
    results = []
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        for case in (c for c in _cases() if c[0] in wanted):
            try:
                result = check(*case, dtype, args.device, args.shrink)
            except Exception as exc:  # report and go on: one broken case must not hide the others
                result = {"case": case[0], "dtype": str(dtype), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:  # rewritten after every case: a run cut short by a timeout keeps what it measured
                args.json.write_text(json.dumps(results, indent=2))
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} exact within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
