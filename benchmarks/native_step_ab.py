"""The native decoding step against the torch step, token by token, in one process (issue 19).

``python benchmarks/native_step_ab.py --model smollm2 --threads 1 --prompt-tokens 512 --steps 64``
prefills the same random prompt into two sets of caches, then alternates the two steps (the
torch step with ``native=False`` and the native one), each on its own caches, the same token for
both, and prints the median milliseconds per token of each and their ratio. Alternating token
by token makes the ratio hold on a loaded machine, where whole runs of one contender differ by
several times. The threads are set as ``attnkit generate`` sets them for a quantized model (the
kernels' pool on ``--threads``, torch's other ops on one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.progress import track

from attnkit.cli.generate import add_model_options, load
from attnkit.models.catalog import resolve_model
from attnkit.models.decode_step import DecodeStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    add_model_options(parser)
    args = parser.parse_args()
    model, _ = load(args, resolve_model(args.model))
    n = args.prompt_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(n)
    steps, times = {}, {"torch": [], "native": []}
    with torch.no_grad():
        for name in times:
            caches = model.make_caches(1, n + args.steps)
            logits = model(prompt, positions=positions, cache_positions=positions, caches=caches, key_mask=None,
                           last_only=True)[:, -1]
            steps[name] = DecodeStep(model, caches, None, native=name == "native")
        if steps["native"].native is None:
            raise SystemExit("the native step does not apply to this model")
        token = logits.argmax(-1)
        for step in track(range(args.steps), description="alternating steps"):
            position = torch.tensor([n + step])
            for name in times:
                start = time.perf_counter()
                out = steps[name](token, position, position)
                times[name].append(time.perf_counter() - start)
            token = out.argmax(-1)
    medians = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    print(f"{args.model}: prompt {n}, {args.steps} steps, kernel threads {args.threads}")
    for name, ms in medians.items():
        print(f"  {name:6s} step: {ms:7.2f} ms/token median ({1e3 / ms:6.1f} tokens/s)")
    print(f"  native / torch speed: {medians['torch'] / medians['native']:.2f}x")


if __name__ == "__main__":
    main()
