"""Sliding windows from narrow to as long as the sequence: the sparse backend against masked SDPA.

Why ``auto`` sends float32 CPU windows to the sparse backend (its native band kernel) even when the
window covers most of the square, except when decoding: for each length and window, both backends
run the same forward problem (B=1, H=8, D=64, float32; ``--queries 1`` for one decoding step),
interleaved round-robin, and the table gives their median times and the ratio. Also writes JSON.
Run it alone on the machine (``flock /tmp/attnkit-bench.lock python benchmarks/window_density.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from attnkit import SlidingWindow, attention

HEADS, HEAD_DIM = 8, 64
BACKENDS = ("sparse", "dense")


def _time_round_robin(calls: dict, repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, the calls taking turns (one warm-up each)."""
    times = {name: [] for name in calls}
    for name, call in calls.items():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, action="append", help="lengths (default 1024, 4096, 8192)")
    parser.add_argument("--fraction", type=float, action="append", help="window / length (default 1/4, 1/2, 3/4, 1)")
    parser.add_argument("--queries", type=int, help="queries per call (default: the length; 1 = decoding)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/window_density.json")
    args = parser.parse_args()
    rows = []
    print(f"{'queries':>7} {'N':>6} {'window':>7} {'sparse ms':>10} {'masked SDPA ms':>15} {'SDPA / sparse':>14}")
    for n in args.seq or [1024, 4096, 8192]:
        queries = args.queries or n
        q = torch.randn(1, HEADS, queries, HEAD_DIM)
        k, v = (torch.randn(1, HEADS, n, HEAD_DIM) for _ in range(2))
        for fraction in args.fraction or [0.25, 0.5, 0.75, 1.0]:
            window = max(1, round(n * fraction))
            pattern = SlidingWindow(window)
            calls = {name: (lambda b=name: attention(q, k, v, pattern, backend=b)) for name in BACKENDS}
            medians = _time_round_robin(calls, args.repeats)
            rows.append({"queries": queries, "seq": n, "window": window,
                         **{f"{name}_ms": ms for name, ms in medians.items()}})
            print(f"{queries:>7} {n:>6} {window:>7} {medians['sparse']:>10.3f} {medians['dense']:>15.3f} "
                  f"{medians['dense'] / medians['sparse']:>13.2f}x", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(args.json, "w") as out:
        json.dump({"meta": meta, "rows": rows}, out, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
