"""What do attention sinks cost? ``attention(..., sinks=)`` against the same call without sinks (with
and without ``return_lse``: the sinks need the LSE, which rules out SDPA's fused path), and
against transformers' gpt-oss eager attention (the sink as one more softmax column over the full
square: the only CPU peer with sinks), forward + backward, in one process, interleaved.

    PYTHONPATH=src python benchmarks/sinks_overhead.py [--repeats 5]

Prints one JSON line per case: median milliseconds with sinks, without (plain, and with the LSE),
the peer's (when it runs the case), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from attnkit import Causal, SlidingWindow, attention


def _step(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each of ``fns``, run in turn ``repeats`` times after one warm-up."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_step(fn))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _gpt_oss_eager(q, k, v, sinks):
    """transformers' gpt-oss eager attention over (B, H, N, D) inputs with a causal mask."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    class Module:
        num_key_value_groups = q.shape[1] // k.shape[1]
        training = False

    Module.sinks = sinks
    n = q.shape[2]
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    return eager_attention_forward(Module, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


def _cases(n: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, n, 64, generator=gen).requires_grad_()
    k, v = (torch.randn(1, 2, n, 64, generator=gen).requires_grad_() for _ in range(2))
    sinks = torch.randn(8, generator=gen).requires_grad_()
    for label, pattern, peer in (("causal", Causal(), True), ("window 256", SlidingWindow(256), False)):
        fns = {
            "sinks": lambda p=pattern: attention(q, k, v, p, sinks=sinks).sum().backward(),
            "plain": lambda p=pattern: attention(q, k, v, p).sum().backward(),
            "plain with lse": lambda p=pattern: sum(t.sum() for t in attention(q, k, v, p, return_lse=True)).backward(),
        }
        if peer:
            fns["gpt-oss eager"] = lambda: _gpt_oss_eager(q, k, v, sinks).sum().backward()
        yield f"auto {label} N={n} GQA 8/2 D=64 fwd+bwd", fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    args = parser.parse_args()
    for n in args.sizes:
        for case, fns in _cases(n):
            ms = _medians(fns, args.repeats)
            row = {"case": case, **{f"{name} ms": round(value, 2) for name, value in ms.items()},
                   "sinks / plain": round(ms["sinks"] / ms["plain"], 3),
                   "sinks / plain with lse": round(ms["sinks"] / ms["plain with lse"], 3)}
            if "gpt-oss eager" in ms:
                row["sinks / gpt-oss eager"] = round(ms["sinks"] / ms["gpt-oss eager"], 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
