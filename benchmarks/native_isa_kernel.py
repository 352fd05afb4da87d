"""The native band kernel alone, per instruction-set build: forward and backward CPU time on one thread.

Calls the kernel's forward and backward entry points directly (no autograd, no planner) on
SlidingWindow(``--window``) at N=``--seq``, B=1, H=8, D=64, float32, for each ``--isa`` build, and
prints the best and the median of ``--repeats`` rounds of the thread's CPU time, the multiply-adds
per second of the forward pass, and backward / forward. ``--source DIR`` also builds
``DIR/band_attention.c`` (an older version, say: ``git show REV:src/attnkit/kernels/csrc/band_attention.c
> DIR/band_attention.c``) for the same builds, to compare versions: the two builds of each ISA take
turns round by round, so that both see the same load. ``--score-mod KIND`` (repeatable: softcap at 30,
alibi with random slopes, distance_bias with a random 64-column table) also times each build with that
score modification, taking turns with the plain kernel in the same way (the backward pass without the
parameter's gradient). CPU time on one thread is what other processes on a shared machine change least.
Writes JSON too.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from pathlib import Path

import torch

from attnkit.kernels import band_native, native_build
from attnkit.kernels.score_mods import alibi, distance_bias, softcap


_SIZE_TYPES = [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
_MOD_TYPES = [ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]


def _entry_points(library: ctypes.CDLL, q, k, v, band, scale: float, score_mod=None):
    """``(forward, backward)`` calls of one library's entry points on these inputs (one thread),
    with ``score_mod`` (None for none; its parameter gets no gradient)."""
    library.band_attention_forward.argtypes = [ctypes.c_void_p] * 5 + _SIZE_TYPES + _MOD_TYPES
    library.band_attention_backward.argtypes = [ctypes.c_void_p] * 9 + _SIZE_TYPES + _MOD_TYPES + [ctypes.c_void_p]
    mod, parameter = band_native.mod_arguments(q, score_mod)  # parameter: kept alive by the closures
    sizes = band_native._sizes(q, k, band, scale) + mod
    out, lse = torch.empty_like(q), torch.empty(q.shape[:-1])
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def forward():
        assert parameter is None or parameter.data_ptr() == mod[2]
        library.band_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *sizes)

    forward()
    delta = (d_out * out).sum(-1).contiguous()
    d_q, d_k, d_v = (torch.empty_like(t) for t in (q, k, v))

    def backward():
        d_k.zero_(), d_v.zero_()  # the entry point adds into them
        library.band_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(), d_out.data_ptr(),
                                        delta.data_ptr(), d_q.data_ptr(), d_k.data_ptr(), d_v.data_ptr(), *sizes, None)

    return forward, backward


def _cpu_ms(calls: dict, repeats: int) -> dict[str, list[float]]:
    """CPU milliseconds of each call per round, the calls taking turns (their order reversed every
    other round) after one warm-up each, so that both sources see the same machine."""
    times = {name: [] for name in calls}
    for call in calls.values():
        call()
    for round_index in range(repeats):
        for name in (list(calls) if round_index % 2 else list(calls)[::-1]):
            start = time.thread_time()
            calls[name]()
            times[name].append((time.thread_time() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", action="append", help="builds (default: auto, avx2, generic)")
    parser.add_argument("--source", help="a directory with another band_attention.c to compare")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--score-mod", action="append", choices=("softcap", "alibi", "distance_bias"), default=[],
                        help="also time the kernel with this score modification")
    parser.add_argument("--json", default="benchmarks/results/native_isa_kernel.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the kernel then runs on this thread: its CPU time is the call's
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, args.seq, 64, generator=gen) for _ in range(3))
    score_mods = {"softcap": softcap(30.0), "alibi": alibi(torch.rand(8, generator=gen)),
                  "distance_bias": distance_bias(torch.randn(8, 64, generator=gen))}
    band = (0, args.window - 1)
    sources = {"current": native_build.SOURCE_DIR, **({"--source": Path(args.source)} if args.source else {})}
    multiply_adds = 2 * 8 * args.seq * args.window * 64  # the band's q.k and p.v products
    rows = []
    print(f"{'source':<22} {'build':<48} {'forward ms':>10} {'median':>7} {'GFMA/s':>7} {'backward ms':>11} "
          f"{'median':>7} {'bwd / fwd':>9}")
    for isa in args.isa or ["auto", "avx2", "generic"]:
        calls, paths = {}, {}
        for label, directory in sources.items():
            native_build.SOURCE_DIR = directory
            native_build.clear_cache()
            built = native_build.load_native("band_attention", isa)
            if built.library is None:
                print(f"{label:<22} {isa}: {built.message}")
                continue
            paths[label] = built.isa or "(not reported)"
            calls[f"{label} forward"], calls[f"{label} backward"] = _entry_points(built.library, q, k, v, band, 0.125)
            for kind in args.score_mod:
                modified = f"{label}+{kind}"
                paths[modified] = paths[label]
                calls[f"{modified} forward"], calls[f"{modified} backward"] = _entry_points(
                    built.library, q, k, v, band, 0.125, score_mods[kind])
        times = _cpu_ms(calls, args.repeats)
        for label, path in paths.items():
            forward, backward = times[f"{label} forward"], times[f"{label} backward"]
            row = {"source": label, "isa": isa, "path": path, "forward_ms": min(forward),
                   "forward_median_ms": statistics.median(forward), "backward_ms": min(backward),
                   "backward_median_ms": statistics.median(backward),
                   "forward_gfma_s": multiply_adds / min(forward) / 1e6, "forward_samples_ms": forward,
                   "backward_samples_ms": backward}
            rows.append(row)
            print(f"{label:<22} {isa + ': ' + path:<48} {row['forward_ms']:>10.1f} {row['forward_median_ms']:>7.1f} "
                  f"{row['forward_gfma_s']:>7.1f} {row['backward_ms']:>11.1f} {row['backward_median_ms']:>7.1f} "
                  f"{row['backward_ms'] / row['forward_ms']:>9.2f}", flush=True)
    native_build.SOURCE_DIR = sources["current"]
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as out_file:
        json.dump({"seq": args.seq, "window": args.window, "score_mods": args.score_mod,
                   "clock": "thread CPU time, one thread", "rows": rows},
                  out_file, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
