"""Did the kernel hardening (layout copies, the visibility check, chunked masks, the merge
check) slow anything down? Times attnkit calls against a direct SDPA call in the same process.

Run once per version of attnkit and compare the ratios (the machine may be loaded):
    PYTHONPATH=src python benchmarks/hardening_overhead.py --label new
Prints one JSON line per case: median milliseconds of attnkit and of its SDPA peer, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from attnkit import Causal, SlidingWindow, Strided, attention


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cases():
    gen = torch.Generator().manual_seed(0)

    def qkv(n_q, n_k, heads=8, dim=64, grad=False):
        q = torch.randn(1, heads, n_q, dim, generator=gen)
        k, v = (torch.randn(1, heads, n_k, dim, generator=gen) for _ in range(2))
        return [t.requires_grad_(grad) for t in (q, k, v)]

    for n in (1024, 4096):
        q, k, v = qkv(n, n)
        yield (f"auto causal N={n} fwd", lambda q=q, k=k, v=v: attention(q, k, v, Causal()),
               lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 9 if n < 4096 else 3)
        yield (f"auto causal N={n} fwd+lse", lambda q=q, k=k, v=v: attention(q, k, v, Causal(), return_lse=True),
               lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 9 if n < 4096 else 3)
    q, k, v = qkv(1024, 1024, grad=True)
    yield ("auto causal N=1024 fwd+bwd", lambda: attention(q, k, v, Causal()).sum().backward(),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(), 7)
    q, k, v = qkv(1, 4096)
    yield ("auto decode Nq=1 Nk=4096", lambda: attention(q, k, v, Causal()),
           lambda: F.scaled_dot_product_attention(q, k, v), 50)
    q, k, v = qkv(4096, 4096)
    mask = SlidingWindow(2048).mask(4096, 4096)
    yield ("dense SlidingWindow(2048) N=4096", lambda: attention(q, k, v, SlidingWindow(2048), backend="dense"),
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), 3)
    q, k, v = qkv(8192, 8192, heads=4)
    yield ("sparse Strided(128) N=8192", lambda: attention(q, k, v, Strided(128), backend="sparse"),
           lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="name of the attnkit version under test")
    args = parser.parse_args()
    for name, run, peer, repeats in _cases():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            ours, sdpa = _median_ms(run, repeats), _median_ms(peer, repeats)
        print(json.dumps({"label": args.label, "case": name, "attnkit_ms": round(ours, 3),
                          "sdpa_ms": round(sdpa, 3), "ratio": round(ours / sdpa, 3)}), flush=True)


if __name__ == "__main__":
    main()
