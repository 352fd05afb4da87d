"""Ring attention on CPU: attnkit against ring-attention-pytorch, same run, same shapes.

For each world size (gloo processes on this machine, one torch thread each):

1. correctness: out, dq, dk, dv of every contender on a small causal problem, gathered and compared
   with single-process float64 attention (max error relative to the largest entry);
2. time: forward + backward of a causal problem, median over repeats of the slowest rank, with
   every contender run round-robin so load changes hit all alike;
3. balance: attnkit's per-rank kernel CPU seconds (zigzag against contiguous);
4. steps: a SlidingWindow case over contiguous shards, steps run against ceil(window/shard) + 1.

Prints a table and writes JSON. Needs the ``bench`` extra (ring-attention-pytorch).
Run it alone on the machine (``flock /tmp/attnkit-bench.lock python benchmarks/ring_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.distributed as dist

from attnkit import Causal, SlidingWindow, attention
from attnkit.distributed import assemble, record_ring_stats, ring_attention, shard
from attnkit.distributed.launch import run_group

HEADS, HEAD_DIM = 8, 64
CHECK_SEQ = 1024
BUCKET = 1024  # ring-attention-pytorch's bucket size in its contiguous mode (the function's default)
CONTENDERS = ("attnkit zigzag", "attnkit contiguous", "ring-attention-pytorch", "ring-attention-pytorch striped")
LAYOUT = {"attnkit zigzag": "zigzag", "attnkit contiguous": "contiguous",
          "ring-attention-pytorch": "contiguous", "ring-attention-pytorch striped": "striped"}


def _problem(seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, HEADS, seq, HEAD_DIM, generator=g) for _ in range(4)]  # q, k, v, d_out


def _run(contender: str, q, k, v, d_out, pattern=Causal()):
    """Forward + backward of one contender on this rank's shards ``(B, H, n, D)``; returns
    ``(out, dq, dk, dv)`` in the same layout."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if contender.startswith("attnkit"):
        out = ring_attention(q, k, v, pattern, layout=LAYOUT[contender], timeout=600)
        out.backward(d_out)
        return out.detach(), q.grad, k.grad, v.grad
    from ring_attention_pytorch import ring_flash_attn

    theirs = [t.transpose(1, 2) for t in (q, k, v)]  # their layout is (B, n, H, D)
    striped = contender.endswith("striped")
    # Their striped mode expects token t on rank t % P when the bucket is the whole shard.
    bucket = q.shape[2] if striped else BUCKET
    out = ring_flash_attn(*theirs, causal=True, bucket_size=bucket, ring_reduce_col=True,
                          striped_ring_attn=striped)
    out.backward(d_out.transpose(1, 2))
    return out.detach().transpose(1, 2), q.grad, k.grad, v.grad


def _worker(rank: int, world: int, seq: int, repeats: int, window: int) -> dict:
    result = {"check": {}, "times": {c: [] for c in CONTENDERS}, "cpu": {c: [] for c in CONTENDERS}}
    q, k, v, d_out = _problem(CHECK_SEQ, 0)
    for contender in CONTENDERS:
        layout = LAYOUT[contender]
        result["check"][contender] = _run(contender, *(shard(t, layout) for t in (q, k, v, d_out)))
    q, k, v, d_out = _problem(seq, 1)
    shards = {layout: [shard(t, layout) for t in (q, k, v, d_out)] for layout in set(LAYOUT.values())}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for contender in CONTENDERS:
            dist.barrier()
            with record_ring_stats() as stats:
                start = time.perf_counter()
                _run(contender, *shards[LAYOUT[contender]])
                result["times"][contender].append(time.perf_counter() - start)
            result["cpu"][contender].append(stats.compute_cpu_s)
    with record_ring_stats() as stats:
        start = time.perf_counter()
        _run("attnkit contiguous", *shards["contiguous"], pattern=SlidingWindow(window))
        result["window"] = {"steps": stats.forward_steps, "seconds": time.perf_counter() - start}
    return result


def _errors(world: int, values: list, contender: str) -> dict:
    layout = LAYOUT[contender]
    q, k, v, d_out = (t.double().requires_grad_() for t in _problem(CHECK_SEQ, 0))
    out = attention(q, k, v, Causal(), backend="reference")
    out.backward(d_out)
    expected = [out.detach(), q.grad, k.grad, v.grad]
    errors = {}
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        got = assemble([value["check"][contender][index] for value in values], layout).double()
        errors[name] = float((got - expected[index]).abs().max() / expected[index].abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="timed sequence length (default 8192)")
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (default 2 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--window", type=int, default=1024, help="SlidingWindow size of the step case")
    parser.add_argument("--json", default="benchmarks/ring_bench.json", help="where to write the JSON")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = []
    for world in args.world:
        ranks = run_group(_worker, world, args.seq, args.repeats, args.window,
                          deadline_s=3600, group_timeout_s=900)
        failed = [f"rank {r.rank}: {r.error}" for r in ranks if not r.ok]
        if failed:
            raise SystemExit(f"world {world} failed: {failed}")
        values = [r.value for r in ranks]
        shard_len = args.seq // world
        for contender in CONTENDERS:
            # A round's time is its slowest rank; the median is over the timed rounds.
            rounds = [max(v["times"][contender][i] for v in values) for i in range(1, args.repeats + 1)]
            cpu = [statistics.median(v["cpu"][contender][1:]) for v in values]
            rows.append({
                "world": world, "contender": contender, "seq": args.seq, "median_s": statistics.median(rounds),
                "errors": _errors(world, values, contender),
                "rank_kernel_cpu_s": cpu if contender.startswith("attnkit") else None,
                "imbalance": (max(cpu) / min(cpu) - 1) if contender.startswith("attnkit") else None,
            })
        rows.append({
            "world": world, "contender": f"attnkit window {args.window} contiguous", "seq": args.seq,
            "median_s": max(v["window"]["seconds"] for v in values), "errors": None,
            "steps": values[0]["window"]["steps"],
            "steps_bound": math.ceil(args.window / shard_len) + 1, "rank_kernel_cpu_s": None, "imbalance": None,
        })

    table = Table(title=f"ring attention, causal fwd+bwd, B=1 H={HEADS} D={HEAD_DIM} N={args.seq} float32, CPU")
    for column in ("P", "contender", "median s", "max rel err out / dq / dk / dv (N=1024)",
                   "kernel CPU s per rank", "imbalance", "steps"):
        table.add_column(column)
    for row in rows:
        errors = row["errors"]
        table.add_row(
            str(row["world"]), row["contender"], f"{row['median_s']:.2f}",
            " / ".join(f"{errors[n]:.1e}" for n in ("out", "dq", "dk", "dv")) if errors else "-",
            ", ".join(f"{c:.2f}" for c in row["rank_kernel_cpu_s"]) if row["rank_kernel_cpu_s"] else "-",
            f"{100 * row['imbalance']:.1f}%" if row["imbalance"] is not None else "-",
            f"{row['steps']} (bound {row['steps_bound']}, P={row['world']})" if "steps" in row else "-",
        )
    Console(width=200).print(table)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    with open(args.json, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
