"""``attnkit bench``: time attnkit's backends against torch SDPA (and later peers) side by side."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..analysis.plots import plot_bench
from ..bench.cases import CASE_SETS, DEFAULT_SEQS, QUICK_SEQS
from ..bench.runner import count_steps, run_benchmark
from ..bench.sparse_cases import QUICK_SPARSE_SEQS, SPARSE_CASE_SETS
from ..bench.table import describe_cases, plain_table, rich_table


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time attention backends and peers on the same inputs",
        description="Median time, useful GFLOP/s, error against float64 reference_attention and "
        "the largest tensor allocated, for every contender on every workload.",
    )
    parser.add_argument("--case", action="append", choices=sorted([*CASE_SETS, "decode", "document"]),
                        help="workload set (repeatable; default: causal); decode: whole-model generation of "
                        "--model against llama.cpp, alone; document: packed documents against masked SDPA "
                        "and compiled FlexAttention, alone (--seq: one N, default 32768)")
    parser.add_argument("--seq", type=int, action="append", metavar="N",
                        help=f"sequence length (repeatable; default: {', '.join(map(str, DEFAULT_SEQS))})")
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: 3 repeats at N={', '.join(map(str, QUICK_SEQS))} (causal) or "
                        f"N={', '.join(map(str, QUICK_SPARSE_SEQS))} (sparse cases)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 5)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of time against N")
    decode = parser.add_argument_group("--case decode")
    decode.add_argument("--model", metavar="NAME|PATH", help="the GGUF file (or model name) both contenders run "
                        "(default: smollm2)")
    decode.add_argument("--threads", type=int, default=None, help="threads of every contender (default: torch's)")
    decode.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    decode.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run (default 128)")
    decode.add_argument("--variant", action="append", default=[],
                        choices=("bf16", "fp32", "int8", "no-pack", "compile", "x-float32", "x-int8", "torch-step"),
                        help="an extra attnkit contender beside the defaults (repeatable)")
    decode.add_argument("--busy", type=int, default=0, metavar="N",
                        help="processes that keep N cores busy during the whole run (contention; default 0)")
    decode.add_argument("--no-llama-cpp", action="store_true", help="attnkit contenders only")
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> tuple[list[str], dict[str, tuple[int, ...]], int]:
    """The cases, the lengths to run each at, and the repeats; ValueError on a bad argument."""
    cases = args.case or ["causal"]
    if args.seq:
        seqs = {case: tuple(args.seq) for case in cases}
    elif args.quick:
        seqs = {case: QUICK_SPARSE_SEQS if case in SPARSE_CASE_SETS else QUICK_SEQS for case in cases}
    else:
        seqs = {case: DEFAULT_SEQS for case in cases}
    bad = [n for n in args.seq or () if n <= 0]
    if bad:
        raise ValueError(f"--seq must be positive, got {bad[0]}")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    if repeats <= 0:
        raise ValueError(f"--repeats must be positive, got {repeats}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available on this machine")
    for path in (args.json, args.plot):
        if path is not None and not path.parent.exists():
            raise FileNotFoundError(f"directory {path.parent} does not exist (for {path})")
    return cases, seqs, repeats


def run(args: argparse.Namespace) -> int:
    if "decode" in (args.case or ()):
        return _run_decode(args)
    if "document" in (args.case or ()):
        return _run_document(args)
    cases, seqs, repeats = _check(args)
    workloads = [w for case in cases for w in CASE_SETS[case](seqs[case])]
    console = Console()
    with _progress(count_steps(workloads, backward=args.backward)) as step:
        rows = run_benchmark(workloads, repeats=repeats, backward=args.backward, device=args.device, on_step=step)
    title = (f"attnkit bench ({rows[0].mode}, {torch.get_num_threads()} threads; ratio = time / torch sdpa; "
             f"{describe_cases(workloads)})")
    if console.is_terminal:
        console.print(rich_table(rows, title))
    else:  # piped or redirected: no width to fit, so no column is cut short
        print(plain_table(rows, title))
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
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _run_decode(args: argparse.Namespace) -> int:
    """``--case decode``: :func:`attnkit.bench.decode_peers.run_decode_peers` on ``--model``."""
    import tempfile

    from ..bench import decode_peers
    from ..models.catalog import resolve_model

    if args.case != ["decode"]:
        raise ValueError("--case decode runs alone; give it without other cases")
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"--threads must be positive, got {args.threads}")
    if args.busy < 0:
        raise ValueError(f"--busy must be zero or positive, got {args.busy}")
    model = resolve_model(args.model, default="smollm2")
    threads = args.threads or torch.get_num_threads()
    with_peer = not args.no_llama_cpp and decode_peers.llama_cpp_available()
    if not args.no_llama_cpp and not with_peer:
        print("note: xllamacpp is not installed (pip install -e '.[llamacpp]'); only attnkit runs", file=sys.stderr)
    contenders = decode_peers.default_contenders(with_peer, tuple(args.variant))
    repeats = args.repeats or 3
    logs = Path(tempfile.mkdtemp(prefix="attnkit-decode-"))  # kept: a failed worker's error names its log
    with _progress(len(contenders) * (2 + repeats)) as step:
        results = decode_peers.run_decode_peers(model, contenders, threads=threads, prompt_tokens=args.prompt_tokens,
                                                new_tokens=args.new_tokens, repeats=repeats, busy=args.busy, log_dir=logs,
                                                on_step=step)
    title = (f"{model.name}: prompt {args.prompt_tokens} tokens, {args.new_tokens} new, {threads} threads, "
             f"median of {repeats}" + (f", {args.busy} busy process(es) spinning" if args.busy else ""))
    console = Console()
    if not console.is_terminal:  # piped or redirected: wide enough that no column is cut short
        console = Console(width=160)
    console.print(decode_peers.results_table(results, title))
    if args.json:
        meta = {"command": "attnkit " + " ".join(args.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "model": str(model), "threads": threads, "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens, "busy": args.busy, "torch": torch.__version__, "xllamacpp": decode_peers.llama_cpp_version(),
                "load_average": os.getloadavg()}
        args.json.write_text(decode_peers.results_json(results, meta))
        print(f"wrote {args.json}")
    return 0


def _run_document(args: argparse.Namespace) -> int:
    """``--case document``: :func:`attnkit.bench.documents.run_document_bench` at one ``--seq``."""
    from ..bench import documents

    if args.case != ["document"] or len(args.seq or ()) > 1:
        raise ValueError("--case document runs alone, at one --seq; give it without other cases")
    n = args.seq[0] if args.seq else documents.DOCUMENT_SEQ
    if n <= 0 or (args.repeats is not None and args.repeats <= 0):
        raise ValueError(f"--seq and --repeats must be positive, got {n} and {args.repeats}")
    with _progress(8) as step:
        result = documents.run_document_bench(n, repeats=args.repeats or 3, on_step=step)
    Console(width=None if Console().is_terminal else 160).print(documents.document_table(result))
    if args.json:
        result["command"] = "attnkit " + " ".join(args.argv)
        result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A ``step(description)`` callback that shows progress on stderr: a live bar on a terminal,
    else one line per step with the elapsed time (so a redirected run is never silent)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        start, done = time.perf_counter(), 0

        def line(description: str) -> None:
            nonlocal done
            done += 1
            print(f"[{done}/{total} {time.perf_counter() - start:6.1f} s] {description}", file=sys.stderr, flush=True)

        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("benchmark", total=total)

        def step(description: str) -> None:
            progress.update(task, description=escape(description))
            progress.advance(task)

        yield step
