"""The native decoding step of this checkout against a baseline build of it, token by token (issue 19).

``python benchmarks/native_build_ab.py --model FILE --threads 2 --prompt-tokens 512 --steps 64 --baseline main``
compiles ``decode_step.c`` and ``gguf_matmul.c`` as they are at the git ref ``--baseline`` (with
the flags ``attnkit`` builds with), prefills a random prompt once, then runs both builds' steps
at every position, in alternating order, on the same plan and caches (both write the same keys
and values), and prints the median milliseconds per token of each, their ratio, the largest
difference of their logits and whether their greedy tokens agree. With ``--serial-attention`` a
third contender runs this checkout's build with attention on the calling thread (the plan's pool
pointer cleared). With ``--head`` it also times the head's product alone (the tied embedding for
Gemma 3) in both builds, as GB/s of its weights.
The load average before and after is printed: two-thread numbers mean something only when quiet.
The two builds' C structures must be the same (the plan is built by this checkout).
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

import torch
from rich.progress import track

from attnkit.cli.generate import add_model_options, load
from attnkit.kernels import native_build
from attnkit.kernels.native_step import _P, _I64, _Model
from attnkit.kernels.quant_native import _library as quant_library, kernel_threads
from attnkit.models.catalog import resolve_model
from attnkit.models.decode_step import DecodeStep

CSRC = "src/attnkit/kernels/csrc"


def baseline_libraries(ref: str, directory: Path) -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """(decode_step, gguf_matmul) compiled from the sources at git ``ref``."""
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{ref}:{CSRC}"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{ref}:{CSRC}/{name}"], cwd=root, capture_output=True,
                              check=True).stdout
        (directory / name).write_bytes(text)
    libraries = []
    tunings = native_build.ISA_CHOICES[native_build.requested_isa()]
    for name in ("decode_step", "gguf_matmul"):
        target = directory / f"{name}.so"
        error = native_build._build(native_build._compiler(), tunings, directory / f"{name}.c", target)
        if error is not None:
            raise SystemExit(f"baseline {name}: {error}")
        libraries.append(ctypes.CDLL(str(target)))
    libraries[0].ds_step.argtypes = [ctypes.POINTER(_Model), _I64, _I64, _P]
    libraries[0].ds_step.restype = ctypes.c_int
    return libraries[0], libraries[1]


def use_build(plan, step_library: ctypes.CDLL, quant: ctypes.CDLL, pool: bool) -> None:
    """Point ``plan`` at a build's ``ds_step`` and kernels, and at its own pool for attention
    (``pool``; a baseline without ``gguf_pool_run`` ignores the field)."""
    plan._library = step_library
    plan._model.matmul = ctypes.cast(quant.gguf_matmul, _P).value
    plan._model.dequantize = ctypes.cast(quant.gguf_dequantize, _P).value
    has_pool = pool and hasattr(quant, "gguf_pool_run")
    plan._model.run_pool = ctypes.cast(quant.gguf_pool_run, _P).value if has_pool else None


def time_head(plan, quants: dict[str, ctypes.CDLL], repeats: int = 40) -> None:
    """Print the median time and GB/s of the head's product alone in each build, alternating."""
    head = plan._model.head
    x, out = torch.randn(head.in_), torch.empty(head.out)
    row_bytes = next(t for t in plan._keep if t.dtype == torch.uint8 and t.data_ptr() == head.weight).shape[1]
    bytes_read = head.out * row_bytes
    times = {name: [] for name in quants}
    for i in range(repeats):
        for name in (list(quants) if i % 2 == 0 else list(quants)[::-1]):
            start = time.perf_counter()
            status = quants[name].gguf_matmul(ctypes.c_int(head.type), ctypes.c_void_p(x.data_ptr()), _I64(1),
                                              _I64(head.in_), ctypes.c_void_p(head.weight), _I64(head.out),
                                              ctypes.c_void_p(out.data_ptr()), ctypes.c_int(kernel_threads()),
                                              ctypes.c_int(0))
            times[name].append(time.perf_counter() - start)
            if status:
                raise SystemExit(f"{name} head product failed: status {status}")
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        print(f"  {name:5s} head: {ms:7.2f} ms ({bytes_read / ms / 1e6:5.1f} GB/s of {bytes_read / 1e6:.0f} MB)")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--baseline", default="main", help="git ref of the baseline sources")
    parser.add_argument("--head", action="store_true", help="also time the head's product alone")
    parser.add_argument("--serial-attention", action="store_true",
                        help="a third contender: this checkout's build with attention on the calling thread")
    add_model_options(parser)
    args = parser.parse_args()
    print(f"load average before: {load_average()}")
    model, _ = load(args, resolve_model(args.model))
    n = args.prompt_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n)
    with torch.no_grad():
        caches = model.make_caches(1, n + args.steps)
        logits = model(prompt, positions=positions, cache_positions=positions, caches=caches, key_mask=None,
                       last_only=True)[:, -1]
        step = DecodeStep(model, caches, None, native=True)
    if step.native is None:
        raise SystemExit("the native step does not apply to this model")
    plan = step.native.plan
    with tempfile.TemporaryDirectory() as directory:
        base_step, base_quant = baseline_libraries(args.baseline, Path(directory))
        builds = {"base": (base_step, base_quant, True), "new": (plan._library, quant_library(), True)}
        if args.serial_attention:
            builds["new, serial attention"] = (plan._library, quant_library(), False)
        times = {name: [] for name in builds}
        outs = {name: torch.empty(plan.vocab_size) for name in builds}
        token, worst, agree = int(logits.argmax(-1)), 0.0, 0
        for i in track(range(args.steps), description="alternating builds"):
            for name in (list(builds) if i % 2 == 0 else list(builds)[::-1]):
                use_build(plan, *builds[name])
                start = time.perf_counter()
                plan.step(token, n + i, outs[name])
                times[name].append(time.perf_counter() - start)
            scale = float(outs["base"].abs().max())
            worst = max(worst, float((outs["new"] - outs["base"]).abs().max()) / scale)
            agree += int(outs["new"].argmax()) == int(outs["base"].argmax())
            token = int(outs["new"].argmax())
        medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
        print(f"{args.model}: prompt {n}, {args.steps} steps, kernel threads {kernel_threads()}, "
              f"baseline {args.baseline}")
        for name, ms in medians.items():
            print(f"  {name:22s} step: {ms:7.2f} ms/token median ({1e3 / ms:6.1f} tokens/s, "
                  f"{medians['base'] / ms:.3f}x base)")
        print(f"  logits: largest |new - base| / max|base| = {worst:.2e}; greedy tokens agree {agree}/{args.steps}")
        if args.head:
            time_head(plan, {"base": base_quant, "new": quant_library()})
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
