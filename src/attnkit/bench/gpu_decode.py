"""Issue 19's GPU item: the static-cache decode step under CUDA graphs against transformers.

``python -m attnkit.bench.gpu_decode --out DIR`` builds the Llama-3.2-1B shape with random weights
in bfloat16 on the GPU (transformers' model and attnkit's on the same tensors, as
:mod:`~attnkit.bench.llama_bench` does), and generates greedily, batch 1, from a 512-token prompt:

- ``attnkit eager``: :func:`~attnkit.models.generate.stream`, the plain step;
- ``attnkit graph``: ``stream(..., compile=True)``: the static-cache step through ``torch.compile``
  with ``mode="reduce-overhead"`` (a CUDA graph; :mod:`~attnkit.models.decode_step`);
- ``transformers eager``: ``generate()`` with its dynamic cache;
- ``transformers static+compile``: ``generate(cache_implementation="static")``, which transformers
  compiles on CUDA.

A decode step's time is the median interval between consecutive tokens of one run after its first
4 steps (compilation and graph recording happen there: their seconds are reported apart,
as ``warm_s``); the prefill is the time to the first token of an eager run. The floor: the bytes a
step reads (weights once, the KV cache at the run's mean context;
:func:`~attnkit.analysis.llama_costs.decode_bytes_per_token`) over the best measured read
bandwidth of the card. Each row also counts how many leading greedy tokens equal the first row's
(same weights; bfloat16 rounding may part them late). Targets: attnkit graph >= 50% of the floor
and >= 8x transformers eager; prefill >= transformers. ``gpu_decode.json`` under ``--out`` is
rewritten after every contender, so a run cut off keeps what it measured. ``--tiny`` (the ``tiny`` preset, float32) checks the
logic on a CPU, where the compiled contenders are skipped (CUDA graphs; compiling takes minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..analysis.llama_costs import decode_bytes_per_token
from ..models.generate import stream
from ..models.llama import Llama, LlamaConfig
from .llama_bench import _Clock, _sync, build_models, read_bandwidth
from .table import print_section

FULL = dict(preset="llama3.2-1b", dtype=torch.bfloat16, prompt=512, tokens=32, warm=4, read_gib=1.0)
TINY = dict(preset="tiny", dtype=torch.float32, prompt=16, tokens=6, warm=2, read_gib=1 / 16)


Timed = tuple[float, list[float], list[int]]
"""``(start, [when each new token was ready], [the new tokens])`` of one greedy run, batch 1."""


def _attnkit_times(model, prompt: torch.Tensor, new: int, compile: bool) -> Timed:
    _sync(prompt.device)
    start, times, tokens = time.perf_counter(), [], []
    for token in stream(model, prompt, new, stop_tokens=(), compile=compile):
        _sync(prompt.device)
        times.append(time.perf_counter())
        tokens.append(token)
    return start, times, torch.cat(tokens).tolist()


def _transformers_times(hf, prompt: torch.Tensor, new: int, static: bool) -> Timed:
    clock = _Clock(prompt.device)
    extra = {"cache_implementation": "static"} if static else {}
    _sync(prompt.device)
    start = time.perf_counter()
    out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock, **extra)
    return start, clock.times[1:], out[0, prompt.shape[1]:].tolist()  # times[0]: the prompt handed over


def contenders(models: dict, device: torch.device) -> tuple[dict[str, Callable], dict[str, str]]:
    """``({name: run(prompt, new) -> Timed}, {name: why skipped})``."""
    ours, hf = models["attnkit"], models.get("transformers")
    found = {"attnkit eager": lambda p, n: _attnkit_times(ours, p, n, False)}
    skipped = {}
    if device.type == "cuda":
        found["attnkit graph"] = lambda p, n: _attnkit_times(ours, p, n, True)
    else:
        skipped["attnkit graph"] = "CUDA graphs need CUDA"
    if hf is None:
        skipped["transformers eager"] = skipped["transformers static+compile"] = "transformers is not installed"
        return found, skipped
    found["transformers eager"] = lambda p, n: _transformers_times(hf, p, n, False)
    if device.type == "cuda":
        found["transformers static+compile"] = lambda p, n: _transformers_times(hf, p, n, True)
    else:
        skipped["transformers static+compile"] = "transformers compiles its static cache on CUDA only"
    return found, skipped


def _models(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> dict:
    try:
        import transformers  # noqa: F401 - the peer; the GPU image may lack it
    except ImportError:
        torch.manual_seed(0)
        with torch.device(device):
            return {"attnkit": Llama(config).to(dtype).eval()}
    with torch.device(device):  # the random weights made on the GPU: 1.2B of them on a CPU take minutes
        models = build_models(config, dtype, device=str(device))
    return {name: models[name] for name in ("attnkit", "transformers")}


def run(out_dir: Path, device: torch.device, shape: dict) -> dict:
    """Measure each contender (one warm-up run of 2 tokens, one timed run); returns (and writes) the result."""
    config = LlamaConfig.preset(shape["preset"])
    models = _models(config, shape["dtype"], device)
    calls, skipped = contenders(models, device)
    prompt = torch.randint(0, config.vocab_size, (1, shape["prompt"]), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    warm, tokens = shape["warm"], shape["tokens"]
    bandwidth = read_bandwidth(device, shape["read_gib"])  # the best of 5 reads
    context = shape["prompt"] + warm + tokens // 2  # the timed steps' mean context
    floor_s = decode_bytes_per_token(config, context, shape["dtype"].itemsize) / bandwidth
    result = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                       "torch": torch.__version__, "preset": shape["preset"], "dtype": str(shape["dtype"]),
                       "prompt": shape["prompt"], "timed_steps": tokens, "warm_steps": warm,
                       "read_bandwidth_gb_s": bandwidth / 1e9, "floor_step_ms": floor_s * 1e3},
              "rows": [], "skipped": skipped}
    path = out_dir / "gpu_decode.json"
    first_tokens: list[int] = []  # the first contender's greedy tokens: the others' agreement is counted
    for name, call in calls.items():
        try:
            with torch.no_grad():
                first = time.perf_counter()
                call(prompt, 2)  # warm-up: kernels loaded; the compiled contenders compile here
                first_s = time.perf_counter() - first
                start, times, new_tokens = call(prompt, 1 + warm + tokens)
        except Exception as exc:  # noqa: BLE001 - the next contender still runs
            result["skipped"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        steps = [b - a for a, b in zip(times[warm:], times[warm + 1:])]
        step = statistics.median(steps)
        first_tokens = first_tokens or new_tokens
        agree = next((i for i, (a, b) in enumerate(zip(new_tokens, first_tokens)) if a != b), len(new_tokens))
        result["rows"].append({"contender": name, "prefill_ms": (times[0] - start) * 1e3,
                               "step_ms": step * 1e3, "decode_tok_s": 1 / step, "floor_share": floor_s / step,
                               "warm_s": times[warm] - start, "first_run_s": first_s,
                               "tokens": len(new_tokens), "leading_tokens_as_first_row": agree})
        path.write_text(json.dumps(result, indent=1))
    eager = next((r for r in result["rows"] if r["contender"] == "transformers eager"), None)
    for row in result["rows"]:
        row["x_transformers_eager"] = None if eager is None else eager["step_ms"] / row["step_ms"]
    path.write_text(json.dumps(result, indent=1))
    return result


def _print(result: dict) -> None:
    meta = result["meta"]
    title = (f"decode, {meta['preset']} {meta['dtype']} on {meta['device']}, prompt {meta['prompt']}: "
             f"floor {meta['floor_step_ms']:.3f} ms a step ({meta['read_bandwidth_gb_s']:.0f} GB/s read)")
    rows = [[row["contender"], f"{row['prefill_ms']:.1f}", f"{row['step_ms']:.3f}", f"{row['decode_tok_s']:.1f}",
             f"{100 * row['floor_share']:.0f}%",
             "-" if row["x_transformers_eager"] is None else f"{row['x_transformers_eager']:.2f}", f"{row['warm_s']:.1f}"]
            for row in result["rows"]]
    print_section(title, ("contender", "prefill ms", "step ms", "tokens/s", "of floor", "x transformers eager", "warm s"),
                  rows, result["skipped"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.gpu_decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_decode.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset in float32 (check the logic on a CPU)")
    parser.add_argument("--tokens", type=int, help="timed decode steps (default 32; tiny 6)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    shape = dict(TINY if args.tiny else FULL)
    if args.tokens is not None:
        if args.tokens < 2:
            parser.error(f"--tokens must be at least 2, got {args.tokens}")
        shape["tokens"] = args.tokens
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, torch.device(args.device), shape)
    _print(result)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
