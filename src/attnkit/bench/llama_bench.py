"""Generation speed of attnkit's Llama against transformers' ``generate()`` on the same weights.

Weights: random ones in a preset's shape (attnkit's parameters are the transformers tensors,
assigned in place), or a real model with ``--model PATH`` (a checkpoint directory or a GGUF
file, loaded by each library itself). Each run generates ``1 + decode`` tokens greedily with no
stop token and is timed from inside: the prefill is the time to the first new token, the decode
the time from the first new token to the last (``decode`` steps), so both are measured, never
inferred as a difference. Median over repeats; runs of the contenders interleave so load from
other processes hits all alike. ``attnkit packed`` is the model after
:func:`~attnkit.models.cpu_pack.pack_for_cpu` (CPU only); ``attnkit int8`` (``--int8``) after
:func:`~attnkit.models.int8.quantize_int8`. The memory-bandwidth floor of a decode step is
``bytes read per token / measured read bandwidth`` (best of the measurements between repeats).

Run: ``python -m attnkit.bench.llama_bench --preset llama3.2-1b --dtype bf16 --int8 --json out.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from ..analysis.llama_costs import decode_bytes_per_token, kv_bytes_per_token, prefill_flops_per_token
from ..models.cpu_pack import pack_for_cpu, packed_dtype_supported
from ..models.generate import stream
from ..models.llama import Llama, LlamaConfig
from ..models.llama.hf_checkpoint import config_to_hf, hf_name

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Best observed bytes/s of summing a ``gib`` GiB float32 tensor on ``device`` (a streaming read)."""
    x = torch.ones(int(gib * 2**30 // 4), device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def _random_hf(config: LlamaConfig, dtype: torch.dtype, seed: int):
    import transformers

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(config)))
    finally:
        torch.set_default_dtype(default)


def _hf_from_path(path, dtype: torch.dtype):
    from pathlib import Path

    import transformers

    from ..models.gguf_file import is_gguf

    path = Path(path)
    if is_gguf(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype)


def build_models(config: LlamaConfig, dtype: torch.dtype, seed: int = 0, *, device: str = "cpu",
                 model_path=None, int8: bool = False, note=print) -> dict:
    """``transformers``, ``attnkit`` (on the transformers tensors, or loaded from ``model_path``
    by attnkit itself), ``attnkit packed`` (CPU, when the CPU can pack ``dtype``) and, with
    ``int8``, ``attnkit int8`` models, all on ``device``."""
    from ..models.int8 import quantize_int8
    from ..models.llama import load_llama

    hf = (_random_hf(config, dtype, seed) if model_path is None else _hf_from_path(model_path, dtype)).to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf_state = hf.state_dict()

    def ours() -> Llama:
        if model_path is not None:
            return load_llama(model_path, dtype=dtype, device=device)
        with torch.device("meta"):
            model = Llama(config)
        model.load_state_dict({n: hf_state[hf_name(n)] for n in model.state_dict()}, assign=True)
        model.rope.reset_frequencies(device)
        return model.eval()

    models = {"transformers": hf, "attnkit": ours()}
    if torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available():
        if packed_dtype_supported(dtype):
            models["attnkit packed"] = pack_for_cpu(ours())
        else:
            note(f"note: this CPU cannot pack {dtype} weights; 'attnkit packed' left out")
    if int8:
        models["attnkit int8"] = quantize_int8(ours())
    return models


class _Clock:
    """A transformers streamer that only records when each ``put`` (prompt, then each token) arrives."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _run_transformers(hf, prompt: torch.Tensor, new: int):
    clock = _Clock(prompt.device)
    _sync(prompt.device)
    start = time.perf_counter()
    out = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
    _sync(prompt.device)
    end = time.perf_counter()
    first = clock.times[1]  # times[0] is the prompt being handed over
    return first - start, end - first, out[:, prompt.shape[1]:]


def _run_attnkit(model, prompt: torch.Tensor, new: int):
    _sync(prompt.device)
    start = time.perf_counter()
    first, tokens = None, []
    for token in stream(model, prompt, new, stop_tokens=()):
        tokens.append(token)
        if first is None:
            _sync(prompt.device)
            first = time.perf_counter()
    _sync(prompt.device)
    return first - start, time.perf_counter() - first, torch.stack(tokens, 1)


def _run(name: str, model, prompt: torch.Tensor, new: int):
    return (_run_transformers if name == "transformers" else _run_attnkit)(model, prompt, new)


def measure(models: dict, prompt: torch.Tensor, decode: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of each model, how many leading greedy tokens each agrees on with
    transformers, each attnkit variant's largest logit difference from plain attnkit (relative to
    the largest logit), and the best read bandwidth seen between repeats (the floor's denominator)."""
    if decode < 1 or repeats < 1:
        raise ValueError(f"measure: decode and repeats must be >= 1, got {decode} and {repeats}")
    times = {name: {"prefill": [], "decode": []} for name in models}
    tokens, bandwidths = {}, []
    with torch.no_grad():
        for name, model in models.items():  # warm-up
            _run(name, model, prompt, 2)
        for _ in range(repeats):
            bandwidths.append(read_bandwidth(prompt.device))
            for name, model in models.items():
                prefill_s, decode_s, tokens[name] = _run(name, model, prompt, 1 + decode)
                times[name]["prefill"].append(prefill_s)
                times[name]["decode"].append(decode_s)
    out = {"read_bandwidth": max(bandwidths)}
    for name, t in times.items():
        prefill, decode_s = statistics.median(t["prefill"]), statistics.median(t["decode"])
        out[name] = {"prefill_s": prefill, "decode_s": decode_s, "prefill_tok_s": prompt.numel() / prefill,
                     "decode_tok_s": decode * prompt.shape[0] / decode_s}
    with torch.no_grad():  # how far each attnkit variant's logits are from plain attnkit's, same dtype
        plain = models["attnkit"](prompt, last_only=True).float()
        out["logits_error"] = {name: float((model(prompt, last_only=True).float() - plain).abs().max()
                                           / plain.abs().max())
                               for name, model in models.items() if name.startswith("attnkit ")}
    reference = tokens["transformers"].cpu()
    out["greedy_tokens_agreeing"] = {
        name: (t.cpu() == reference).cumprod(-1).sum(-1).tolist() for name, t in tokens.items()
    }
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3.2-1b", help="shape of the random model (ignored with --model)")
    parser.add_argument("--model", metavar="PATH", help="a real model: checkpoint directory or .gguf file")
    parser.add_argument("--layers", type=int, help="keep only this many layers of the preset")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--int8", action="store_true", help="add the weight-only int8 attnkit model")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens timed (after the first new token)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results as JSON")
    return parser


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("prompt", "decode", "batch", "repeats", "layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.model is not None:
        from ..models.checkpoint import checkpoint_format

        try:
            checkpoint_format(args.model)
        except FileNotFoundError as exc:
            parser.error(str(exc))
    models = build_models(LlamaConfig.preset(args.preset, **({"n_layers": args.layers} if args.layers else {})),
                          dtype, device=args.device, model_path=args.model, int8=args.int8,
                          note=lambda m: print(m, file=sys.stderr))
    config = models["attnkit"].config
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    result = measure(models, prompt.to(device), args.decode, args.repeats)
    bandwidth = result.pop("read_bandwidth")
    context = args.prompt + args.decode // 2  # mean context of the timed decode steps
    bytes_per_token = {name: decode_bytes_per_token(config, context, dtype.itemsize, args.batch) for name in models}
    if "attnkit int8" in models:  # int8 weights, the KV cache still in dtype
        bytes_per_token["attnkit int8"] = (decode_bytes_per_token(config, 0, 1, args.batch)
                                           + kv_bytes_per_token(config, dtype.itemsize) * context)
    for name in models:
        r = result[name]
        r["decode_floor_share"] = bytes_per_token[name] / bandwidth * r["decode_tok_s"] / args.batch
        r["prefill_gflop_s"] = prefill_flops_per_token(config, args.prompt) * r["prefill_tok_s"] / 1e9
    floor_tok_s = args.batch * bandwidth / bytes_per_token["attnkit"]
    result["meta"] = {
        "command": "python -m attnkit.bench.llama_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"{platform.machine()} {platform.processor()}".strip()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": args.model or args.preset,
        "layers": config.n_layers, "dtype": args.dtype, "device": args.device,
        "parameters": sum(p.numel() for p in models["attnkit"].parameters()),
        "read_bandwidth_gb_s": bandwidth / 1e9, "decode_bytes_per_token": bytes_per_token["attnkit"],
        "decode_floor_tok_s": floor_tok_s,
    }
    t = result["transformers"]
    print(f"{args.model or args.preset} ({config.n_layers} layers, {args.dtype}, {args.device}), prompt {args.prompt}, "
          f"decode {args.decode}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'':16}{'prefill tok/s':>14}{'x hf':>7}{'decode tok/s':>14}{'x hf':>7}{'of floor':>10}  greedy = hf")
    for name in models:
        r = result[name]
        print(f"{name:16}{r['prefill_tok_s']:14.1f}{r['prefill_tok_s'] / t['prefill_tok_s']:6.2f}x"
              f"{r['decode_tok_s']:14.2f}{r['decode_tok_s'] / t['decode_tok_s']:6.2f}x"
              f"{100 * r['decode_floor_share']:9.0f}%  {result['greedy_tokens_agreeing'][name]}")
    for name, error in result["logits_error"].items():
        print(f"{name}: last-position logits differ from attnkit's by {error:.2e} of their largest magnitude")
    print(f"bandwidth floor ({args.dtype}): {bytes_per_token['attnkit'] / 1e9:.3f} GB read per decoded token / "
          f"{bandwidth / 1e9:.1f} GB/s -> {floor_tok_s:.2f} tok/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
