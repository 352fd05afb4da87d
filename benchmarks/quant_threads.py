"""Decode speed of SmolLM2-135M (GGUF blocks kept) by thread setting: torch's threads for the
ops between the quantized products, and the native kernels' pool threads (``set_kernel_threads``),
with float32 or int8 activations. Settings interleaved, ``--repeats`` rounds, medians; decode
tokens/s of ``--new-tokens`` after a ``--prompt-tokens`` prompt. Run under contention by starting,
for example, ``taskset -c 1 python -c "while True: pass"`` first.
Run: ``python benchmarks/quant_threads.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from attnkit.kernels.quant_native import set_kernel_threads
from attnkit.models.generate import stream
from attnkit.models.llama import default_model, load_llama
from attnkit.models.quant import set_quant_activations

SETTINGS = [  # (torch threads, kernel threads)
    (1, 1), (2, 2), (1, 2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--activations", action="append", help="float32 and/or int8 (default: both)")
    args = parser.parse_args()
    model = load_llama(default_model())
    prompt = [list(range(100, 100 + args.prompt_tokens))]
    contenders = [(t, k, a) for a in args.activations or ["float32", "int8"] for t, k in SETTINGS]
    times = {c: [] for c in contenders}
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for round_ in range(args.repeats + 1):  # the first round warms up
        for torch_threads, kernel_threads, activations in contenders:
            torch.set_num_threads(torch_threads)
            set_kernel_threads(kernel_threads)
            set_quant_activations(model, activations)
            steps = stream(model, prompt, args.new_tokens, stop_tokens=())
            next(steps)  # the prefill
            start = time.perf_counter()
            for _ in steps:
                pass
            if round_:
                times[(torch_threads, kernel_threads, activations)].append(time.perf_counter() - start)
    for (torch_threads, kernel_threads, activations), seconds in times.items():
        rate = (args.new_tokens - 1) / statistics.median(seconds)
        print(f"torch threads {torch_threads}  kernel threads {kernel_threads}  {activations:8} "
              f"decode {rate:6.1f} tok/s  (runs: {', '.join(f'{(args.new_tokens - 1) / s:.1f}' for s in seconds)})")
    print(f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
