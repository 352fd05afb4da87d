"""Speed of the GGUF kernels (``gguf_matmul``) on each weight shape of SmolLM2-135M and Gemma 3
270M, one activation row (decoding) and a few, cache-hot and cache-cold, against a build of a
baseline source tree (main's kernel) and the machine's streaming read, interleaved in one run.

- hot: the same weight again and again (it stays in cache): the kernel's instruction throughput.
- cold: a pass over copies of the weight that fill ``--cold-mb`` (a decode step streams ~96 MB of
  blocks, every byte once): what decoding sees, bounded by memory bandwidth.
- stream: ``torch.sum`` of an int64 tensor of ``--stream-mb`` (a plain sequential read) on the same
  thread count, the reference for the cold GB/s.
- pool: a call on a tiny matrix at each thread count (the wake-up and join of the pool's workers).

Both builds are compiled here with attnkit's flags for each ``--isa`` and called through ctypes with
the same blocks (random bytes with finite scales, in the kernel layout), so the ratio ``new/base``
of each line is measured side by side. Medians of ``--repeats``; the load average is printed.
Run: ``PYTHONPATH=src python benchmarks/quant_kernel_speed.py --baseline /work/main/src/attnkit/kernels/csrc``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnkit.kernels.native_build import ISA_CHOICES, SOURCE_DIR
from attnkit.kernels.quant_native import FORMATS, to_kernel_layout

SHAPES = {  # (format, out, in): the quantized matrices of each model's decode step
    "smollm2": [("Q4_1", 192, 576), ("Q4_1", 576, 576), ("Q4_1", 1536, 576), ("Q4_1", 576, 1536),
                ("Q8_0", 49152, 576)],
    "gemma3": [("Q4_K", 640, 1024), ("Q4_K", 640, 2048), ("Q6_K", 640, 2048), ("Q5_0", 256, 640),
               ("Q5_0", 1024, 640), ("Q5_0", 2048, 640), ("Q8_0", 256, 640), ("Q8_0", 262144, 640)],
}


def build(csrc: Path, isa: str, where: Path) -> ctypes.CDLL:
    """``csrc/gguf_matmul.c`` compiled for ``isa`` with native_build's flags."""
    target = where / f"{csrc.parent.parent.parent.name}-{abs(hash(str(csrc)))}-{isa}.so"
    subprocess.run(["cc", "-O3", "-std=gnu11", "-fPIC", "-shared", "-pthread", *ISA_CHOICES[isa][0],
                    str(csrc / "gguf_matmul.c"), "-o", str(target), "-lm"], check=True)
    library = ctypes.CDLL(str(target))
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.gguf_matmul.argtypes = [i, p, i64, i64, p, i64, p, i, i]
    return library


def random_blocks(fmt: str, out: int, in_features: int, rng: np.random.Generator) -> torch.Tensor:
    """Random rows of ``fmt`` with small finite fp16 scales, in the kernel layout."""
    quant = FORMATS[fmt]
    raw = rng.integers(0, 256, (out, in_features // quant.block_weights, quant.block_bytes), dtype=np.uint8)
    scale_at = {"Q4_K": (0, 4), "Q6_K": (208, 210)}.get(fmt, (0, 4 if fmt == "Q4_1" else 2))
    scales = rng.uniform(1e-3, 2e-3, raw.shape[:2] + ((scale_at[1] - scale_at[0]) // 2,)).astype(np.float16)
    raw[:, :, scale_at[0]:scale_at[1]] = scales.view(np.uint8).reshape(*raw.shape[:2], -1)
    return to_kernel_layout(torch.from_numpy(raw.reshape(out, -1)), quant).contiguous()


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="csrc directory of the baseline kernel")
    parser.add_argument("--isa", action="append", help="builds (default: avx512 avx2 generic)")
    parser.add_argument("--threads", type=int, action="append", help="thread counts (default: 1 and 2)")
    parser.add_argument("--rows", type=int, action="append", help="activation rows (default: 1)")
    parser.add_argument("--model", action="append", choices=sorted(SHAPES), help="default: both")
    parser.add_argument("--int8", action="store_true", help="int8 activations instead of float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hot-repeats", type=int, default=50)
    parser.add_argument("--cold-mb", type=float, default=256)
    parser.add_argument("--stream-mb", type=float, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    stream = torch.ones(int(args.stream_mb * 2 ** 20) // 8, dtype=torch.int64)
    print(f"load average {os.getloadavg()[0]:.2f}; activations {'int8' if args.int8 else 'float32'}")
    with tempfile.TemporaryDirectory() as where:
        for isa in args.isa or ["avx512", "avx2", "generic"]:
            libraries = {"base": build(args.baseline, isa, Path(where)), "new": build(SOURCE_DIR, isa, Path(where))}
            for threads in args.threads or [1, 2]:
                torch.set_num_threads(threads)
                read = args.stream_mb * 2 ** 20 / timed(lambda: stream.sum(), args.repeats) / 1e9
                tiny = random_blocks("Q4_1", 8, 64, rng)
                x_tiny, y_tiny = torch.randn(1, 64), torch.empty(1, 8)
                pool = {name: timed(lambda lib=lib: lib.gguf_matmul(3, x_tiny.data_ptr(), 1, 64, tiny.data_ptr(), 8,
                                                                    y_tiny.data_ptr(), threads, args.int8), 2000)
                        for name, lib in libraries.items()}
                print(f"\n{isa} threads {threads}: stream read {read:.2f} GB/s; tiny call "
                      + " ".join(f"{name} {seconds * 1e6:.2f} us" for name, seconds in pool.items()))
                for model in args.model or sorted(SHAPES):
                    for fmt, out, in_features in SHAPES[model]:
                        blocks = random_blocks(fmt, out, in_features, rng)
                        copies = [blocks] + [blocks.clone() for _ in range(
                            max(1, int(args.cold_mb * 2 ** 20 / blocks.numel())) - 1)]
                        for rows in args.rows or [1]:
                            x, y = torch.randn(rows, in_features), torch.empty(rows, out)
                            macs, size = rows * out * in_features, blocks.numel()
                            result = {}
                            for name, lib in libraries.items():
                                def call(w, lib=lib):
                                    lib.gguf_matmul(FORMATS[fmt].ggml_type, x.data_ptr(), rows, in_features,
                                                    w.data_ptr(), out, y.data_ptr(), threads, args.int8)
                                hot = timed(lambda: [call(blocks) for _ in range(args.hot_repeats)],
                                            args.repeats) / args.hot_repeats
                                cold = timed(lambda: [call(w) for w in copies], args.repeats) / len(copies)
                                result[name] = hot, cold
                            (bh, bc), (nh, nc) = result["base"], result["new"]
                            print(f"  {model:7} {fmt} {out:6}x{in_features:<5} rows {rows}: hot {bh * 1e6:8.1f} -> "
                                  f"{nh * 1e6:8.1f} us ({bh / nh:4.2f}x, {macs / nh / 1e9:5.1f} GMAC/s)  cold "
                                  f"{bc * 1e6:8.1f} -> {nc * 1e6:8.1f} us ({bc / nc:4.2f}x, "
                                  f"{size / bc / 1e9:5.2f} -> {size / nc / 1e9:5.2f} GB/s = "
                                  f"{size / nc / 1e9 / read:4.0%} of stream)")
    print(f"\nload average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
