"""``attnkit generate --model DIR --prompt TEXT``: stream a continuation and report tokens/s."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt with a Llama checkpoint (Hugging Face layout)",
        description="Load a Llama directory (config.json, safetensors, tokenizer.json), stream the "
        "continuation of --prompt, then report prefill and decode tokens/s.",
    )
    parser.add_argument("--model", required=True, help="checkpoint directory in the Hugging Face layout")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop-token", type=int, action="append", metavar="ID",
                        help="token id that ends generation (repeatable; default: the config's eos ids)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast the weights (default: as stored)")
    parser.add_argument("--no-pack", action="store_true", help="skip oneDNN weight packing on CPU")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .cpu_pack import pack_for_cpu
    from .generate import stream
    from .hf import load_tokenizer
    from .llama import Llama

    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer.json, which generate needs to read --prompt")
    if not args.prompt:
        raise ValueError("--prompt is empty")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    model = Llama.from_pretrained(args.model, dtype=dtype)
    if not args.no_pack and torch.backends.mkldnn.is_available() and model.embed_tokens.weight.dtype != torch.float16:
        pack_for_cpu(model)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    new: list[int] = []
    shown = ""
    start = time.perf_counter()
    prefill_s = 0.0
    for step, token in enumerate(stream(model, [ids], args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                        stop_tokens=args.stop_token)):
        if step == 0:
            prefill_s = time.perf_counter() - start
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text
    total_s = time.perf_counter() - start
    decode = max(len(new) - 1, 0)
    print(file=sys.stdout)
    rate = f"{decode / (total_s - prefill_s):.1f} tokens/s" if decode else "n/a"
    print(f"prefill: {len(ids)} tokens in {prefill_s:.2f} s ({len(ids) / max(prefill_s, 1e-9):.1f} tokens/s); "
          f"decode: {decode} tokens ({rate})", file=sys.stderr)
    return 0
