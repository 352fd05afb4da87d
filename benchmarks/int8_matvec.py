"""One decoded token's matrix-vector products on the llama3.2-1b MLP shape: plain bf16, oneDNN-packed
bf16 (``pack_for_cpu``) and weight-only int8 (``Int8Linear``), interleaved, median of ``--repeats``.

Eight 8192 x 2048 weights (256 MiB in bf16) so that the weights do not stay in cache.
Run: ``python benchmarks/int8_matvec.py --threads 1 --threads 2``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnkit.models.cpu_pack import PackedLinear
from attnkit.models.int8 import Int8Linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default 2)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(8192, 2048).bfloat16() for _ in range(8)]
    layers = {
        "plain bf16": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights],
        "packed bf16": [PackedLinear(w) for w in weights],
        "int8": [Int8Linear(w) for w in weights],
    }
    x = torch.randn(1, 2048).bfloat16()
    for threads in args.threads or [2]:
        torch.set_num_threads(threads)
        times = {name: [] for name in layers}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fns in layers.items():
                start = time.perf_counter()
                for fn in fns:
                    fn(x)
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t[1:]) for name, t in times.items()}
        for name, seconds in medians.items():
            print(f"threads {threads}  {name:12} {seconds * 1e3:8.2f} ms   "
                  f"{medians['packed bf16'] / seconds:5.2f}x packed bf16")


if __name__ == "__main__":
    main()
