"""One decoded token's matrix-vector products on the llama3.2-1b MLP shape: plain bf16, oneDNN-packed
bf16 (``pack_for_cpu``), torch's int8 kernel (``_weight_int8pack_mm``) and attnkit's native int8
kernel (``Int8Linear`` on the CPU), interleaved, median of ``--repeats``.

Eight 8192 x 2048 weights (256 MiB in bf16) so that the weights do not stay in cache. Each product
is timed by the wall clock and by the process's CPU time (all its threads): on a machine shared
with other jobs the wall clock includes time spent waiting for a core, the CPU time does not.
Run: ``python benchmarks/int8_matvec.py --threads 1 --threads 2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from attnkit.models.cpu_pack import PackedLinear
from attnkit.models.int8 import Int8Linear

OUT, IN, LAYERS = 8192, 2048, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default 2)")
    parser.add_argument("--rows", type=int, default=1, help="activation rows (1 = one decoded token)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(OUT, IN).bfloat16() for _ in range(LAYERS)]
    int8 = [Int8Linear(w) for w in weights]
    layers = {
        "plain bf16": [lambda x, w=w: torch.nn.functional.linear(x, w) for w in weights],
        "packed bf16": [PackedLinear(w) for w in weights],
        "torch int8": [lambda x, q=m.weight_int8, s=m.scales.bfloat16(): torch.ops.aten._weight_int8pack_mm(x, q, s)
                       for m in int8],
        "attnkit int8": int8,
    }
    size = {name: LAYERS * OUT * IN * (1 if "int8" in name else 2) for name in layers}
    x = torch.randn(args.rows, IN).bfloat16()
    print(f"load average {os.getloadavg()[0]:.1f}, rows {args.rows}")
    for threads in args.threads or [2]:
        torch.set_num_threads(threads)
        wall = {name: [] for name in layers}
        cpu = {name: [] for name in layers}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fns in layers.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                for fn in fns:
                    fn(x)
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
        median = {name: (statistics.median(wall[name][1:]), statistics.median(cpu[name][1:])) for name in layers}
        for name, (seconds, cpu_seconds) in median.items():
            print(f"threads {threads}  {name:13} wall {seconds * 1e3:7.1f} ms {size[name] / seconds / 1e9:5.1f} GB/s "
                  f"{median['packed bf16'][0] / seconds:5.2f}x packed   cpu {cpu_seconds * 1e3:7.1f} ms "
                  f"{median['packed bf16'][1] / cpu_seconds:5.2f}x packed")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
