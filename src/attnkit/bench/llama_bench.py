"""Generation speed of attnkit's Llama against transformers' ``generate()`` on the same weights.

Both models share one set of random weights (attnkit's parameters are the transformers tensors,
assigned in place). For each, ``generate(max_new_tokens=1)`` times the prefill and
``generate(max_new_tokens=1 + decode)`` the prefill plus ``decode`` more steps; decode time is the
difference. Greedy, no stop tokens, median over repeats. ``attnkit packed`` is the same model
after :func:`~attnkit.models.cpu_pack.pack_for_cpu` (oneDNN-packed copies of the same weights).
The memory-bandwidth floor of a decode step is ``bytes read per token / measured read bandwidth``
(:func:`read_bandwidth`, best of the measurements taken between repeats).

Run: ``python -m attnkit.bench.llama_bench --preset llama3.2-1b --dtype bf16 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from ..analysis.arch import decode_bytes_per_token, prefill_flops_per_token
from ..models.cpu_pack import pack_for_cpu
from ..models.hf import config_to_hf, hf_name
from ..models.llama import Llama, LlamaConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best observed bytes/s of summing a ``gib`` GiB float32 tensor (a streaming read)."""
    x = torch.ones(int(gib * 2**30 // 4))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def build_models(config: LlamaConfig, dtype: torch.dtype, seed: int = 0) -> dict:
    """``transformers``, ``attnkit`` (sharing the transformers tensors) and ``attnkit packed``
    (:func:`~attnkit.models.cpu_pack.pack_for_cpu` of the same weights) models."""
    import transformers

    hf_config = transformers.LlamaConfig(**config_to_hf(config))
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        hf = transformers.LlamaForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf_state = hf.state_dict()

    def shared() -> Llama:
        with torch.device("meta"):
            ours = Llama(config)
        ours.load_state_dict({n: hf_state[hf_name(n)] for n in ours.state_dict()}, assign=True)
        ours.rope.reset_frequencies("cpu")
        return ours.eval()

    return {"transformers": hf, "attnkit": shared(), "attnkit packed": pack_for_cpu(shared())}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(models: dict, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of each model (runs interleaved, so load from other processes
    hits all alike), how many leading greedy tokens each agrees on with transformers, and the best
    read bandwidth seen between repeats (other processes share the memory bus; the best is the floor)."""
    n = prompt.shape[1]
    hf = models["transformers"]
    runs = {"transformers": lambda k: hf.generate(prompt, max_new_tokens=k, do_sample=False, min_new_tokens=k)}
    for name, model in models.items():
        if name != "transformers":
            runs[name] = lambda k, model=model: model.generate(prompt, k, stop_tokens=())
    times = {name: {"prefill": [], "total": []} for name in runs}
    bandwidths = []
    with torch.no_grad():
        for run in runs.values():
            run(2)  # warm-up
        for _ in range(repeats):
            bandwidths.append(read_bandwidth())
            for name, run in runs.items():
                times[name]["prefill"].append(_seconds(lambda: run(1)))
                times[name]["total"].append(_seconds(lambda: run(1 + decode)))
        tokens = {name: run(1 + decode)[:, n:] for name, run in runs.items()}
    out = {"read_bandwidth": max(bandwidths)}
    for name, t in times.items():
        prefill, total = statistics.median(t["prefill"]), statistics.median(t["total"])
        out[name] = {"prefill_s": prefill, "decode_s": total - prefill,
                     "prefill_tok_s": prompt.numel() / prefill,
                     "decode_tok_s": decode * prompt.shape[0] / (total - prefill)}
    out["greedy_tokens_agreeing"] = {
        name: (t == tokens["transformers"]).cumprod(-1).sum(-1).tolist() for name, t in tokens.items()
    }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3.2-1b")
    parser.add_argument("--layers", type=int, help="keep only this many layers of the preset")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens timed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args(argv)
    overrides = {"n_layers": args.layers} if args.layers else {}
    config = LlamaConfig.preset(args.preset, **overrides)
    dtype = DTYPES[args.dtype]
    models = build_models(config, dtype)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    result = measure(models, prompt, args.decode, args.repeats)
    bandwidth = result.pop("read_bandwidth")
    context = args.prompt + args.decode // 2  # mean context of the timed decode steps
    bytes_per_token = decode_bytes_per_token(config, context, dtype.itemsize, args.batch)
    floor_s = bytes_per_token / bandwidth
    for name in models:
        r = result[name]
        r["decode_floor_share"] = floor_s * r["decode_tok_s"]  # floor time / measured time per token
        r["prefill_gflop_s"] = prefill_flops_per_token(config, args.prompt) * r["prefill_tok_s"] / 1e9
    result["meta"] = {
        "command": "python -m attnkit.bench.llama_bench " + " ".join(argv or __import__("sys").argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor()}".strip(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "preset": args.preset, "layers": config.n_layers, "dtype": args.dtype,
        "parameters": sum(p.numel() for p in models["attnkit"].parameters()),
        "read_bandwidth_gb_s": bandwidth / 1e9, "decode_bytes_per_token": bytes_per_token,
        "decode_floor_tok_s": args.batch / floor_s,
    }
    t = result["transformers"]
    print(f"{args.preset} ({config.n_layers} layers, {args.dtype}), prompt {args.prompt}, decode {args.decode}, "
          f"batch {args.batch}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'':16}{'prefill tok/s':>14}{'x hf':>7}{'decode tok/s':>14}{'x hf':>7}{'of floor':>10}  greedy = hf")
    for name in models:
        r = result[name]
        print(f"{name:16}{r['prefill_tok_s']:14.1f}{r['prefill_tok_s'] / t['prefill_tok_s']:6.2f}x"
              f"{r['decode_tok_s']:14.2f}{r['decode_tok_s'] / t['decode_tok_s']:6.2f}x"
              f"{100 * r['decode_floor_share']:9.0f}%  {result['greedy_tokens_agreeing'][name]}")
    print(f"bandwidth floor: {bytes_per_token / 1e9:.3f} GB read per decoded token / {bandwidth / 1e9:.1f} GB/s "
          f"-> {args.batch / floor_s:.2f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
