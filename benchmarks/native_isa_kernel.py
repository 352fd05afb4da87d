"""The native band kernel alone, per instruction-set build: forward and backward CPU time on one thread.

Calls the kernel's forward and backward entry points directly (no autograd, no planner) on
SlidingWindow(``--window``) at N=``--seq``, B=1, H=8, D=64, float32, for each ``--isa`` build, and
prints the best of ``--repeats`` rounds of the thread's CPU time, the multiply-adds per second of
the forward pass, and backward / forward. ``--source DIR`` also builds ``DIR/band_attention.c`` (an
older version, say: ``git show REV:src/attnkit/kernels/csrc/band_attention.c > DIR/band_attention.c``)
for the same builds, to compare versions. CPU time on one thread is what other processes on a
shared machine change least. Writes JSON too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attnkit.kernels import band_native, native_build


def _best_cpu_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", action="append", help="builds (default: auto, avx2, generic)")
    parser.add_argument("--source", help="a directory with another band_attention.c to compare")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/native_isa_kernel.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the kernel then runs on this thread: its CPU time is the call's
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.seq, 64, generator=gen) for _ in range(3))
    band = (0, args.window - 1)
    sources = {"current": native_build.SOURCE_DIR, **({"--source": Path(args.source)} if args.source else {})}
    rows = []
    print(f"{'source':<9} {'build':<48} {'forward ms':>10} {'GFMA/s':>7} {'backward ms':>11} {'bwd / fwd':>9}")
    for label, directory in sources.items():
        for isa in args.isa or ["auto", "avx2", "generic"]:
            native_build.SOURCE_DIR = directory
            native_build.clear_cache()
            os.environ["ATTNKIT_NATIVE_ISA"] = isa
            built = native_build.load_native("band_attention")
            if built.library is None:
                print(f"{label:<9} {isa}: {built.message}")
                continue
            out, lse = band_native.band_forward(q, k, v, band, 0.125)
            d_out = torch.randn(out.shape, generator=gen)
            delta = (d_out * out).sum(-1).contiguous()
            forward = _best_cpu_ms(lambda: band_native.band_forward(q, k, v, band, 0.125), args.repeats)
            backward = _best_cpu_ms(
                lambda: band_native.band_backward(q, k, v, lse, d_out, delta, band, 0.125), args.repeats
            )
            multiply_adds = 2 * 8 * args.seq * args.window * 64  # the band's q.k and p.v products
            row = {"source": label, "isa": isa, "path": built.isa or "(not reported)", "forward_ms": forward,
                   "backward_ms": backward, "forward_gfma_s": multiply_adds / forward / 1e6}
            rows.append(row)
            print(f"{label:<9} {isa + ': ' + row['path']:<48} {forward:>10.1f} {row['forward_gfma_s']:>7.1f} "
                  f"{backward:>11.1f} {backward / forward:>9.2f}", flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as out_file:
        json.dump({"seq": args.seq, "window": args.window, "clock": "thread CPU time, one thread", "rows": rows},
                  out_file, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
