"""Two source trees side by side: the sparse planner, the sparse backend and ``auto``'s dispatch.

For a change that should not cost speed (a refactor of the planner or of the band kernel's
dispatch), both trees run the same cases in one run: rounds alternate between them, each round a
fresh process per tree (``PYTHONPATH=<tree>/src``) that times every case and reports its median;
the table gives the median over rounds of each tree and the ratio (second tree / first). Cases:

- ``plan``: making a sparse plan from nothing (``plan_sparse`` without its cache), N=8192;
- ``fwd`` / ``fwd+bwd``: ``attention(backend="sparse")``, B=1, H=8, D=64, float32, N=4096 (the
  window runs the native band kernel where it runs, Strided's band part too);
- ``pick``: ``make_problem`` and ``auto``'s pick for one decoding query (B=1, H=8, Nk=512).

Run it alone on the machine (``flock /tmp/attnkit-bench.lock python benchmarks/trees_ab.py OLD NEW``);
``--json`` keeps the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

N_PLAN, N_RUN, HEADS, HEAD_DIM, DECODE_KEYS = 8192, 4096, 8, 64, 512


def _patterns() -> dict:
    import torch

    from attnkit import BlockSparse, Fixed, SlidingWindow, Strided

    layout = torch.rand(N_PLAN // 128, N_PLAN // 128, generator=torch.Generator().manual_seed(0)) < 0.1
    return {"window": SlidingWindow(256), "strided": Strided(128), "fixed": Fixed(128, 8),
            "blocksparse": BlockSparse(layout | torch.eye(len(layout), dtype=torch.bool), 128)}


def _median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _measure(repeats: int) -> dict[str, float]:
    """One tree's medians (ms; ``pick`` in µs), in this process."""
    import torch

    from attnkit import attention
    from attnkit.backends import make_problem, pick
    from attnkit.kernels.sparse_plan import plan_sparse

    results = {}
    cpu = torch.device("cpu")
    for name, pattern in _patterns().items():
        results[f"plan {name}"] = _median_ms(lambda: plan_sparse.__wrapped__(pattern, N_PLAN, N_PLAN, cpu), repeats)
    for name, pattern in _patterns().items():
        if name == "blocksparse":  # its layout is made for N_PLAN
            continue
        q, k, v = (torch.randn(1, HEADS, N_RUN, HEAD_DIM, requires_grad=True) for _ in range(3))
        with torch.no_grad():
            results[f"fwd {name}"] = _median_ms(lambda: attention(q, k, v, pattern, backend="sparse"), repeats)
        results[f"fwd+bwd {name}"] = _median_ms(
            lambda: attention(q, k, v, pattern, backend="sparse").sum().backward(), repeats)
    q = torch.randn(1, HEADS, 1, HEAD_DIM)
    k, v = (torch.randn(1, HEADS, DECODE_KEYS, HEAD_DIM) for _ in range(2))
    window = _patterns()["window"]
    results["pick window decode (µs)"] = _median_ms(
        lambda: [pick(make_problem(q, k, v, window, None, False)) for _ in range(100)], repeats) * 10
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, help="two source trees (each with src/attnkit)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case in each round")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one round of one tree
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.repeats)))
        return
    if len(args.trees) != 2:
        parser.error("give two trees: the first is the baseline")
    from rich.progress import Progress

    samples: dict[str, dict[str, list[float]]] = {str(tree): {} for tree in args.trees}
    with Progress() as progress:
        task = progress.add_task("rounds", total=args.rounds * 2)
        for _ in range(args.rounds):
            for tree in args.trees:
                env = {**os.environ, "PYTHONPATH": str(tree.resolve() / "src")}
                run = subprocess.run([sys.executable, __file__, "--measure", "--repeats", str(args.repeats)],
                                     env=env, capture_output=True, text=True, check=True)
                for case, value in json.loads(run.stdout.splitlines()[-1]).items():
                    samples[str(tree)].setdefault(case, []).append(value)
                progress.advance(task)
    first, second = (samples[str(tree)] for tree in args.trees)
    rows = [{"case": case, "first": statistics.median(first[case]), "second": statistics.median(second[case])}
            for case in first]
    print(f"{'case':<28} {'first':>10} {'second':>10} {'second/first':>13}")
    for row in rows:
        print(f"{row['case']:<28} {row['first']:>10.2f} {row['second']:>10.2f} {row['second'] / row['first']:>13.3f}")
    if args.json:
        args.json.write_text(json.dumps({"trees": [str(t) for t in args.trees], "load": os.getloadavg(),
                                         "rows": rows, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
