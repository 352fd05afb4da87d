"""``attnkit bench``: time attnkit's backends against torch SDPA (and later peers) side by side."""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from .cases import CASE_SETS, DEFAULT_SEQS, QUICK_SEQS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time attention backends and peers on the same inputs",
        description="Median time, useful GFLOP/s, error against float64 reference_attention and "
        "the largest tensor allocated, for every contender on every workload.",
    )
    parser.add_argument("--case", action="append", choices=sorted(CASE_SETS),
                        help="workload set (repeatable; default: causal)")
    parser.add_argument("--seq", type=int, action="append", metavar="N",
                        help=f"sequence length (repeatable; default: {', '.join(map(str, DEFAULT_SEQS))})")
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: N={', '.join(map(str, QUICK_SEQS))} and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 5)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of time against N")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> tuple[list[str], tuple[int, ...], int]:
    seqs = tuple(args.seq) if args.seq else (QUICK_SEQS if args.quick else DEFAULT_SEQS)
    bad = [n for n in seqs if n <= 0]
    if bad:
        raise ValueError(f"--seq must be positive, got {bad[0]}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats <= 0:
        raise ValueError(f"--repeats must be positive, got {repeats}")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    for path in (args.json, args.plot):
        if path is not None and not path.parent.exists():
            raise FileNotFoundError(f"directory {path.parent} does not exist (for {path})")
    return args.case or ["causal"], seqs, repeats


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .cases import contenders_for
    from .runner import run_benchmark

    cases, seqs, repeats = _check(args)
    workloads = [w for case in cases for w in CASE_SETS[case](seqs)]
    console = Console()
    total = sum(len(contenders_for(w)) + 1 for w in workloads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=total)

        def step(description: str) -> None:
            progress.update(task, description=description)
            progress.advance(task)

        rows = run_benchmark(workloads, repeats=repeats, backward=args.backward, device=args.device, on_step=step)
    console.print(_table(rows, torch.get_num_threads()))
    if args.json:
        meta = {
            "command": "attnkit " + " ".join(args.argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2))
        console.print(f"wrote {args.json}")
    if args.plot:
        from ..analysis.plots import plot_bench

        plot_bench(rows, args.plot)
        console.print(f"wrote {args.plot}")
    return 0


def _table(rows, threads: int):
    from rich.table import Table

    table = Table(title=f"attnkit bench ({rows[0].mode}, {threads} threads; ratio = time / torch sdpa)")
    for name in ("case", "N", "contender", "median ms", "GFLOP/s", "ratio", "max |err|", "largest MiB", "peak MiB", "note"):
        table.add_column(name, justify="left" if name in ("case", "contender", "note") else "right")
    for r in rows:
        ratio = "" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x"
        table.add_row(r.case, str(r.seq), r.contender, f"{r.median_ms:.2f}", f"{r.gflops:.1f}", ratio,
                      f"{r.max_abs_err:.1e}", f"{r.largest_tensor_mib:.1f}",
                      "" if r.peak_mib is None else f"{r.peak_mib:.1f}", r.note)
    return table
