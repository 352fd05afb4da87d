"""Decode speed of Gemma 3 270M: attnkit against llama.cpp (``xllamacpp``) on the same GGUF file.

The file is the ``gemma3-270m`` model of :mod:`attnkit.models.catalog` unless ``--model`` names
another Gemma 3 GGUF file. llama.cpp runs it as it is (Q4_K/Q5_0/Q6_K/Q8_0 weights, its own
kernels). attnkit runs it as ``generate`` does: dequantized to float32 (``fp32``) or bfloat16
(``bf16``) and packed for oneDNN, or with weight-only int8 linears and head (``int8``). Every
contender gets the same prompt token ids (attnkit's tokenizer: ``--filler`` repeats of a
sentence, so the prefill has some length) and generates ``1 + --decode`` tokens greedily with no
stop token; the prefill is timed to the first new token, the decode from the first to the last.
Median over ``--repeats``, contenders interleaved, all in this process with ``--threads`` threads.

Run: ``python benchmarks/gemma3_decode.py --threads 2 --decode 32 --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnkit.models.catalog import find_model
from attnkit.models.cpu_pack import pack_for_cpu
from attnkit.models.generate import stream
from attnkit.models.int8 import quantize_int8
from attnkit.models.registry import identify_causal

SENTENCE = "The river ran past the old mill, and the miller's daughter counted the boats. "


def _time_attnkit(model, ids: list[int], new: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = None
    for _ in stream(model, [ids], new, stop_tokens=()):
        if first is None:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first


class LlamaCpp:
    """llama.cpp through ``xllamacpp``'s in-process server: one slot, greedy, EOS ignored, no prompt reuse."""

    def __init__(self, path: str, threads: int, context: int) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = path
        params.n_ctx = context
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        self.server = xllamacpp.Server(params)

    def __call__(self, ids: list[int], new: int) -> tuple[float, float]:
        request = {"prompt": ids, "n_predict": new, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                   "cache_prompt": False, "stream": True}
        arrivals, chunks = [], []

        def on_chunk(chunk: dict) -> bool:
            arrivals.append(time.perf_counter())
            chunks.append(chunk)
            return False  # go on

        start = time.perf_counter()
        self.server.handle_completions(request, on_chunk)
        made = chunks[-1].get("usage", {}).get("completion_tokens") if chunks else None
        if made != new:
            raise RuntimeError(f"llama.cpp: {made} tokens for {new} asked: {chunks[-1] if chunks else 'no answer'}")
        return arrivals[0] - start, arrivals[-1] - arrivals[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Gemma 3 GGUF file (default: the gemma3-270m model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens timed after the first")
    parser.add_argument("--filler", type=int, default=8, help="repeats of a sentence in the prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", default="fp32,bf16,int8,llama.cpp")
    parser.add_argument("--json", help="write the medians here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or str(find_model("gemma3-270m"))
    checkpoint = identify_causal(path)
    ids = checkpoint.text_tokenizer().encode(SENTENCE * args.filler)
    new = args.decode + 1
    runners = {}
    for name in args.contenders.split(","):
        if name == "llama.cpp":
            runners[name] = LlamaCpp(path, args.threads, len(ids) + new + 16)
        elif name == "int8":
            model = quantize_int8(checkpoint.load())
            runners[name] = lambda i, n, m=model: _time_attnkit(m, i, n)
        else:
            model = pack_for_cpu(checkpoint.load(dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[name]))
            runners[name] = lambda i, n, m=model: _time_attnkit(m, i, n)
    for run in runners.values():
        run(ids, 4)  # warm-up
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name].append(run(ids, new))
    rows = {}
    for name, pairs in times.items():
        prefill = statistics.median(p for p, _ in pairs)
        decode = statistics.median(d for _, d in pairs)
        rows[name] = {"prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": args.decode / decode}
    reference = rows.get("llama.cpp")
    print(f"prompt {len(ids)} tokens, {args.decode} decoded tokens timed, {args.threads} threads, "
          f"medians of {args.repeats}")
    for name, row in rows.items():
        ratio = f"  ({row['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}x llama.cpp decode)" \
            if reference else ""
        print(f"{name:10s} prefill {row['prefill_tokens_per_s']:8.1f} tok/s   decode {row['decode_tokens_per_s']:7.1f} "
              f"tok/s{ratio}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompt_tokens": len(ids), "decode": args.decode, "threads": args.threads,
                       "repeats": args.repeats, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
