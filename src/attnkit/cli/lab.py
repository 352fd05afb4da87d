"""``attnkit lab``: train decoders that differ only in attention, side by side, and report quality
against cost (table, ``lab.json``, ``lab_table.txt``, ``quality_vs_kv.png``, ``quality_vs_tokens.png``)."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..lab.experiment import preset_variants, run_comparison
from ..lab.presets import PRESETS
from ..lab.report import plot_quality_vs_kv, plot_quality_vs_tokens, tables


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="train small decoders differing only in attention (MHA/GQA/MQA/sparse) and compare quality vs cost",
        description="Trains small Llama-style decoders that differ only in attention (MHA, GQA, MQA, sliding "
        "window, strided, fixed, a per-layer mix) on multi-query associative recall and on byte-level "
        "Python standard library source, with the same data, steps, schedule and seeds; reports "
        "validation quality (mean ± std over seeds) against parameters, KV-cache bytes, training and "
        "decode speed. Interrupted runs resume from their last checkpoint.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="size of the comparison (default quick: a few minutes on a 2-core CPU)")
    parser.add_argument("--quick", dest="preset", action="store_const", const="quick", help="same as --preset quick")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present; default)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: 1 for the quick preset, torch's default otherwise)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: the preset's, 3)")
    parser.add_argument("--tasks", help="comma-separated subset of tasks (mqar, stdlib-bytes)")
    parser.add_argument("--variants", help="comma-separated subset of variant names, e.g. MHA,MQA")
    parser.add_argument("--out", type=Path, default=Path("lab-out"), help="output directory (default ./lab-out)")
    parser.add_argument("--checkpoints", type=Path,
                        help="checkpoint directory (default OUT/checkpoints); runs found there resume")
    parser.add_argument("--restart", action="store_true", help="delete the checkpoints first and train from scratch")
    parser.set_defaults(func=run)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def _split(value):
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401  (checked before hours of training, used by the plots)
    except ImportError:
        raise ValueError("attnkit lab writes PNG plots and needs matplotlib (the 'viz' extra)") from None
    preset = PRESETS[args.preset]
    device = _device(args.device)
    n_seeds = preset.seeds if args.seeds is None else args.seeds
    if n_seeds < 1:
        raise ValueError(f"--seeds must be a positive integer, got {n_seeds}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    checkpoints = args.checkpoints or args.out / "checkpoints"
    if args.restart and checkpoints.exists():
        shutil.rmtree(checkpoints)
    threads = args.threads if args.threads is not None else preset.cpu_threads
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        variant_names, task_names = _split(args.variants), _split(args.tasks)
        n_runs = (len(variant_names or preset_variants(preset)) * len(task_names or preset.tasks) * n_seeds)
        overall = progress.add_task("all runs", total=n_runs, loss="")
        current = {"task": None}

        def on_run(label: str, seed: int, steps: int):
            if current["task"] is not None:
                progress.remove_task(current["task"])
                progress.advance(overall)
            current["task"] = progress.add_task(f"{label} · seed {seed}", total=steps, loss="")

            def on_step(step: int, loss: float) -> None:
                progress.update(current["task"], completed=step, loss=f"loss {loss:.3f}")
            return on_step

        tasks = run_comparison(
            preset, seeds=list(range(n_seeds)), device=device, checkpoints=checkpoints,
            variant_names=variant_names, task_names=task_names, on_run=on_run,
        )
        progress.advance(overall)
    result = {
        "preset": preset.name,
        "command": " ".join(["attnkit", *getattr(args, "argv", ["lab"])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"device": device, "cpu": f"{platform.machine()} {platform.processor()}".strip(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "cuda": torch.cuda.get_device_name(0) if device == "cuda" else None},
        "model": preset.shape.__dict__,
        "patterns": {"window": preset.window, "stride": preset.stride, "summary": preset.summary},
        "kv_heads_compensation": "none: GQA/MQA keep dim, heads and head_dim and lose K/V projection parameters",
        "wall_seconds": time.perf_counter() - started,
        "tasks": tasks,
    }
    (args.out / "lab.json").write_text(json.dumps(result, indent=1))
    with open(args.out / "lab_table.txt", "w") as text:
        recorder = Console(file=text, width=170)
        for table in tables(result):
            console.print(table)
            recorder.print(table)
    plot_quality_vs_kv(result, args.out / "quality_vs_kv.png")
    plot_quality_vs_tokens(result, args.out / "quality_vs_tokens.png")
    console.print(f"wrote {args.out}/lab.json, lab_table.txt, quality_vs_kv.png, quality_vs_tokens.png "
                  f"({result['wall_seconds']:.0f} s)")
    return 0
