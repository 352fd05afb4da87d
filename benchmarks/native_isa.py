"""The native band kernel of one instruction-set build against the planner and compiled FlexAttention.

For ``--isa`` (``ATTNKIT_NATIVE_ISA``: auto, avx512, avx2, generic) and SlidingWindow(256) and
Strided(128), B=1, H=8, D=64, float32, at each ``--seq``: the sparse kernel told to run bands on
the native kernel (``native_bands=True``), the same told to run them on the planner, ``attention``
with ``auto`` (whose sparse backend takes the build's decision: known fast, or calibrated), and ``torch.compile(flex_attention)`` with a 128 x 128 block
mask (forward only; it has no CPU backward). Contenders take turns (one warm-up each, then rounds in
balanced orders: within the rounds each contender runs right after every other one equally often,
so use a multiple of 4 rounds with FlexAttention, of 6 without; each round opens with one untimed
call of its first contender, so no timed call follows the previous round's last one) and the table gives medians; the JSON keeps every sample
and each round's order. ``--backward`` times forward + backward of the attnkit paths too.
``--torch-isa avx2`` sets ``ATEN_CPU_CAPABILITY`` so that torch's own kernels (the planner's fused
attention) and FlexAttention's generated code use AVX2 as well: on an AVX-512 machine, the AVX2 build
against peers that also use AVX2, as on an AVX2-only CPU. ``--cpu-time`` runs everything on one
thread and times the thread's CPU time, which other processes on a shared machine change least.
Writes JSON too.

    flock /tmp/attnkit-bench.lock python benchmarks/native_isa.py --isa avx2 --torch-isa avx2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", default="auto", help="ATTNKIT_NATIVE_ISA for the kernel (default auto)")
    parser.add_argument("--torch-isa", help="ATEN_CPU_CAPABILITY for torch and FlexAttention (e.g. avx2)")
    parser.add_argument("--seq", type=int, action="append", help="lengths (default 8192 and 32768)")
    parser.add_argument("--case", action="append", choices=("window", "strided"), help="default: both")
    parser.add_argument("--repeats", type=int, default=8, help="rounds (default 8)")
    parser.add_argument("--backward", action="store_true", help="also forward + backward of the attnkit paths")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by the CPU time of this thread: what other processes on a "
                             "shared machine change least")
    parser.add_argument("--json", default="benchmarks/results/native_isa.json")
    return parser.parse_args()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def balanced_orders(names: list[str]) -> list[list[str]]:
    """Orders of the contenders, one per round, in which each one runs right after every other one
    equally often (a Williams design: n orders for an even count n, 2n for an odd one)."""
    n = len(names)
    first = [0] + [(i + 1) // 2 if i % 2 else n - i // 2 for i in range(1, n)]
    rows = [[(index + shift) % n for index in first] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return [[names[index] for index in row] for row in rows]


def _medians(calls: dict, repeats: int, clock=time.perf_counter) -> tuple[dict[str, float], dict[str, list]]:
    """Median milliseconds of each call, the calls taking turns after one warm-up each, in the orders
    of :func:`balanced_orders` (cycled), each round opened by an untimed call of its first
    contender, so that no timed call runs after one particular other call more often than after
    the rest: a call right after FlexAttention's measured slower in some runs, and a
    shuffle re-seeded for every row once put ``auto`` there in three of five rounds. Also returns
    every call's times (ms, in round order) and each round's order, for the JSON."""
    times = {name: [] for name in calls}
    design = balanced_orders(list(calls))
    orders = [design[round_index % len(design)] for round_index in range(repeats)]
    for call in calls.values():
        call()
    for order in orders:
        calls[order[0]]()  # untimed: no timed call follows the previous round's last contender
        for name in order:
            start = clock()
            calls[name]()
            times[name].append(clock() - start)
    samples = {name: [round(t * 1e3, 3) for t in values] for name, values in times.items()}
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}, {**samples, "order": orders}


def main() -> None:
    args = _arguments()
    os.environ["ATTNKIT_NATIVE_ISA"] = args.isa
    if args.torch_isa:  # read when torch loads its kernels: set before importing it
        os.environ["ATEN_CPU_CAPABILITY"] = args.torch_isa
    import torch

    from attnkit import SlidingWindow, Strided, attention
    from attnkit.bench.peers import flex as _flex
    from attnkit.kernels.band_calibration import band_decision
    from attnkit.kernels.native_build import load_native
    from attnkit.kernels.sparse import sparse_kernel

    if args.cpu_time:  # every contender then runs on this thread: its CPU time is the call's
        torch.set_num_threads(1)
    built = load_native("band_attention")
    if built.library is None:
        raise SystemExit(f"native_isa: no kernel for ATTNKIT_NATIVE_ISA={args.isa}: {built.message}")
    decision = band_decision()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": _cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "torch_isa": torch.backends.cpu.get_cpu_capability(), "kernel_isa": built.isa,
            "auto": decision.reason, "clock": "thread CPU time" if args.cpu_time else "wall"}
    print("\n".join(f"{key}: {value}" for key, value in meta.items()))
    patterns = {"window": SlidingWindow(256), "strided": Strided(128)}
    rows = []
    header = f"{'case':<8} {'N':>6} {'pass':<8} {'native':>9} {'planner':>9} {'auto':>9} {'flex':>9}  ratios"
    print(header)
    for case in args.case or ["window", "strided"]:
        pattern = patterns[case]
        flex = None if args.no_flex else _flex(pattern)[0]
        for n in args.seq or [8192, 32768]:
            q, k, v = (torch.randn(1, 8, n, 64, requires_grad=args.backward) for _ in range(3))

            def path(told, backward):
                def run():
                    if told:
                        out = sparse_kernel(q, k, v, pattern, 64**-0.5, native_bands=told == "native")[0]
                    else:  # auto: the backend's own decision
                        out = attention(q, k, v, pattern)
                    if backward:
                        out.sum().backward()
                return run

            for backward in ([False, True] if args.backward else [False]):
                calls = {"native": path("native", backward), "planner": path("planner", backward),
                         "auto": path(None, backward)}
                if flex is not None and not backward:
                    calls["flex"] = lambda: flex(q.detach(), k.detach(), v.detach())
                clock = time.thread_time if args.cpu_time else time.perf_counter
                with torch.set_grad_enabled(backward):
                    medians, samples = _medians(calls, args.repeats, clock)
                fastest = min(medians["native"], medians["planner"])
                ratios = {"auto / faster exact path": medians["auto"] / fastest}
                if "flex" in medians:
                    ratios["flex / native"] = medians["flex"] / medians["native"]
                    ratios["flex / auto"] = medians["flex"] / medians["auto"]
                row = {"case": case, "seq": n, "pass": "fwd+bwd" if backward else "forward", **medians, **ratios}
                rows.append({**row, "samples_ms": samples})
                print(f"{case:<8} {n:>6} {row['pass']:<8} {medians['native']:>9.1f} {medians['planner']:>9.1f} "
                      f"{medians['auto']:>9.1f} {medians.get('flex', float('nan')):>9.1f}  "
                      + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()), flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as out:
        json.dump({"meta": meta, "rows": rows}, out, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
