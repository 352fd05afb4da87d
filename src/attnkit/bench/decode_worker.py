"""One contender of the decode benchmark, alone in its process (:mod:`attnkit.bench.decode_peers`).

``python -m attnkit.bench.decode_worker attnkit|llama.cpp --model FILE --threads T [--dtype D]
[--int8] [--no-pack] [--compile] [--no-native-step]`` loads the model, answers one JSON line on stdout
(``{"load_s", "baseline_mib"}``), then reads requests from stdin, one JSON line each:
``{"ids": [...], "new": N}`` -> ``{"prefill_s", "decode_s", "tokens", "peak_mib"}`` (``tokens``:
the ids generated, empty for llama.cpp, whose stream carries text). The prefill is
the time from the request to the first new token, the decode the time from the first new token
to the last (``N - 1`` steps); both contenders are timed the same way, from Python, as their
tokens arrive. Decoding is greedy with no stop token. ``peak_mib`` is the process's peak resident
memory so far (``VmHWM``) above ``baseline_mib``, its resident memory after importing its
libraries and before loading the model.

attnkit loads the model as ``attnkit generate`` does with the same options
(:func:`attnkit.cli.generate.load`); llama.cpp runs through the ``xllamacpp`` package (its server
object in process, no HTTP), with ``n_threads`` for both prefill and decode and its other
settings at their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class AttnkitRunner:
    """attnkit's ``generate`` path: the model as the CLI loads it, :func:`~attnkit.models.generate.stream`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ..cli.generate import load
        from ..models.generate import stream

        self.stream, self.compile, self.native = stream, args.compile, not args.no_native_step
        self.model, _ = load(args, Path(args.model))

    def run(self, ids: list[int], new: int) -> tuple[float, float, list[int]]:
        start = time.perf_counter()
        first, tokens = start, []
        for token in self.stream(self.model, [ids], new, stop_tokens=(), compile=self.compile,
                                 native=self.native):
            tokens.append(int(token[0]))
            if len(tokens) == 1:
                first = time.perf_counter()
        return first - start, time.perf_counter() - first, tokens


class LlamaCppRunner:
    """llama.cpp through ``xllamacpp``: one server slot with a context of ``--context`` tokens, the
    completion streamed token by token (greedy: ``top_k = 1``, temperature 0, EOS ignored)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(args.model)
        params.n_ctx = args.context
        params.n_parallel = 1
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
        self.server = xllamacpp.Server(params)

    def run(self, ids: list[int], new: int) -> tuple[float, float, list[int]]:
        """As :meth:`AttnkitRunner.run`, but without the token ids (the streamed chunks carry text
        only): every chunk but the last is one token; the last carries the token count, checked."""
        request = {"prompt": ids, "n_predict": new, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                   "cache_prompt": False, "stream": True}
        arrivals: list[float] = []
        chunks: list[dict] = []

        def on_chunk(chunk: dict) -> bool:
            arrivals.append(time.perf_counter())
            chunks.append(chunk)
            return False  # go on

        start = time.perf_counter()
        self.server.handle_completions(request, on_chunk)
        made = chunks[-1].get("usage", {}).get("completion_tokens") if chunks else None
        if made != new:
            raise RuntimeError(f"llama.cpp: {made} tokens for {new} asked: {chunks[-1] if chunks else 'no answer'}")
        return arrivals[0] - start, arrivals[-1] - arrivals[0], []


RUNNERS = {"attnkit": AttnkitRunner, "llama.cpp": LlamaCppRunner}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contender", choices=sorted(RUNNERS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context", type=int, default=1024, help="llama.cpp's context size")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--activations", choices=("float32", "int8"))
    parser.add_argument("--no-pack", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-native-step", action="store_true")
    args = parser.parse_args(argv)
    # Answers go to the original stdout; anything a library prints goes to stderr instead.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.contender == "llama.cpp":
        import xllamacpp  # noqa: F401  (imported before the baseline, like torch for attnkit)
    else:
        import torch  # noqa: F401
    baseline = _status_mib("VmRSS")
    start = time.perf_counter()
    runner = RUNNERS[args.contender](args)
    print(json.dumps({"load_s": time.perf_counter() - start, "baseline_mib": baseline}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        prefill_s, decode_s, tokens = runner.run(request["ids"], request["new"])
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens,
                          "peak_mib": _status_mib("VmHWM") - baseline}), file=answers, flush=True)


if __name__ == "__main__":
    main()
