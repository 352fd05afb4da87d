"""Did the kernel hardening (layout copies, the visibility check, chunked masks, the merge
check) slow anything down? Times attnkit calls against a direct SDPA call in the same process.

Run once per version of attnkit and compare the ratios (the machine may be loaded):
    PYTHONPATH=src python benchmarks/hardening_overhead.py --label new
Prints one JSON line per case: median milliseconds of attnkit and of its SDPA peer, and their ratio.

``--checks`` instead times the two per-call checks directly: each case runs alternately with the
checks and with them replaced by no-ops, on one thread, in CPU time (steadier than wall time on
a shared machine).
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


def _checks_on_and_off(repeats: dict[str, int]) -> None:
    import attnkit.functional as functional
    import attnkit.kernels.sparse as sparse

    real = functional.keep_visible, sparse._merge_imprecise
    noop = (lambda result, rerun, q, k, v, pattern: result), (lambda plan, lse: False)
    torch.set_num_threads(1)
    for name, run, _, _ in _cases():
        if "bwd" in name or "dense" in name:
            continue
        times = {True: [], False: []}
        run()
        for i in range(repeats.get(name.split(" N")[0], 5)):
            for on in (True, False) if i % 2 else (False, True):
                functional.keep_visible, sparse._merge_imprecise = real if on else noop
                start = time.process_time()
                with torch.no_grad():
                    run()
                times[on].append(1e3 * (time.process_time() - start))
        functional.keep_visible, sparse._merge_imprecise = real
        with_checks, without = statistics.median(times[True]), statistics.median(times[False])
        print(json.dumps({"case": name, "with_checks_ms": round(with_checks, 3), "without_ms": round(without, 3),
                          "overhead": round(with_checks / without - 1, 4)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", help="name of the attnkit version under test")
    parser.add_argument("--checks", action="store_true", help="time the per-call checks on and off")
    args = parser.parse_args()
    if args.checks:
        _checks_on_and_off({"auto causal": 21, "auto decode Nq=1": 401, "sparse Strided(128)": 11})
        return
    if args.label is None:
        parser.error("--label is required unless --checks is given")
    for name, run, peer, repeats in _cases():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            ours, sdpa = _median_ms(run, repeats), _median_ms(peer, repeats)
        print(json.dumps({"label": args.label, "case": name, "attnkit_ms": round(ours, 3),
                          "sdpa_ms": round(sdpa, 3), "ratio": round(ours / sdpa, 3)}), flush=True)


if __name__ == "__main__":
    main()
