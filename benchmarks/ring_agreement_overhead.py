"""What the ring's agreement check costs per call: ring attention with and without it, same run.

Each world size runs one gloo process group (one torch thread per rank). Every repeat times a
causal forward + backward twice, once as shipped and once with the agreement check replaced by a
no-op, alternating so load changes hit both alike; the table gives the median of the slowest rank.
It also times the pattern fingerprint alone for a few patterns. Small shards on purpose: that is
where a fixed per-call cost shows most.

    python benchmarks/ring_agreement_overhead.py --seq 2048 --world 2 4 --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from attnkit import BlockSparse, Causal, Predicate, SlidingWindow
from attnkit.distributed import ring as ring_module
from attnkit.distributed import ring_attention
from attnkit.distributed.agreement import pattern_fingerprint
from attnkit.distributed.launch import run_group


def _fingerprint_us(seq: int) -> dict[str, float]:
    patterns = {
        "Causal()": Causal(),
        "SlidingWindow(512)": SlidingWindow(512),
        "Predicate(lambda)": Predicate(lambda i, j: (j <= i) & ((i - j) % 7 == 0)),
        "BlockSparse(256 x 256 blocks)": BlockSparse(torch.ones(256, 256, dtype=torch.bool).tril(), seq // 256),
    }
    result = {}
    for name, pattern in patterns.items():
        times = []
        for _ in range(50):
            start = time.perf_counter()
            pattern_fingerprint(pattern, seq)
            times.append(time.perf_counter() - start)
        result[name] = statistics.median(times) * 1e6
    return result


def _timed_calls(rank: int, world: int, seq: int, repeats: int) -> dict[str, list[float]]:
    shipped = ring_module.check_same_everywhere
    q, k, v = (torch.randn(1, 4, seq // world, 64, requires_grad=True) for _ in range(3))
    times: dict[str, list[float]] = {"with check": [], "without check": []}
    for _ in range(repeats):
        for name in times:
            ring_module.check_same_everywhere = shipped if name == "with check" else (lambda *args: None)
            dist.barrier()
            start = time.perf_counter()
            ring_attention(q, k, v, Causal(), timeout=120).sum().backward()
            elapsed = torch.tensor(time.perf_counter() - start)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank decides
            times[name].append(float(elapsed))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="total sequence length (default 2048)")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (default 2 4)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per variant (default 30)")
    args = parser.parse_args()
    print("pattern fingerprint alone, median of 50 (us):")
    for name, us in _fingerprint_us(args.seq).items():
        print(f"  {name:<32} {us:8.0f}")
    print(f"\ncausal forward + backward, B=1 H=4 D=64 N={args.seq}, median of {args.repeats} (ms):")
    print(f"  {'P':>2} {'with check':>12} {'without':>10} {'difference':>11}")
    for world in args.world:
        ranks = run_group(_timed_calls, world, args.seq, args.repeats, deadline_s=600, threads=1)
        failed = [r.error for r in ranks if not r.ok]
        if failed:
            raise SystemExit(f"P={world}: {failed[0]}")
        times = ranks[0].value
        with_check = statistics.median(times["with check"]) * 1e3
        without = statistics.median(times["without check"]) * 1e3
        print(f"  {world:>2} {with_check:12.2f} {without:10.2f} {with_check - without:+11.2f}")


if __name__ == "__main__":
    main()
