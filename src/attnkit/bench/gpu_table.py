"""The whole GPU table of issue 10 in one process: ``python -m attnkit.bench.gpu_table --out DIR``.

Runs each section (a case set at some lengths, forward or forward+backward) with the
``attnkit bench`` runner, in the order of the issue's acceptance list, so one process keeps the
compiled FlexAttention and Triton kernels warm. A section that fails is recorded with its error and
the next one runs; no section starts once ``--budget`` seconds have passed. Also times reading the
decode window's K and V once (the bandwidth yardstick of a decoding step). Writes ``gpu_table.json``
and ``gpu_table.png`` under ``--out``.

``--tiny`` shrinks every shape (B=1, H=2, D=64, float32, N <= 512) to check the script's logic on a
CPU (``--device cpu``; the Triton rows then need ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch
from rich.console import Console

from .cases import CASE_SETS
from .gpu_cases import GPU_SHAPE
from .runner import run_benchmark, time_interleaved
from .table import rich_table

SECTIONS: tuple[tuple[str, tuple[int, ...], bool], ...] = (
    ("gpu-window", (8192, 32768), False),
    ("gpu-window", (8192, 32768), True),
    ("gpu-strided", (16384,), False),
    ("gpu-strided", (16384,), True),
    ("gpu-fixed", (16384,), False),
    ("gpu-fixed", (16384,), True),
    ("gpu-window4096", (32768,), False),
    ("gpu-window4096", (32768,), True),
    ("gpu-causal", (16384,), False),
    ("gpu-causal", (16384,), True),
    ("gpu-decode", (32768,), False),
    ("gpu-blocksparse", (16384,), False),
    ("gpu-blocksparse", (16384,), True),
)
_TINY = dict(batch=1, heads=2, kv_heads=2, head_dim=64, dtype=torch.float32)
_TINY_SEQS = (256, 512)


def _workloads(case: str, seqs: tuple[int, ...], tiny: bool) -> list:
    if tiny:
        seqs = tuple(sorted({min(n, _TINY_SEQS[-1]) for n in seqs} | {_TINY_SEQS[0]}))
    found = CASE_SETS[case](seqs)
    if not tiny:
        return found
    # Tiny shapes keep each pattern but must fit its length (block layouts are made per length).
    return [dataclasses.replace(w, **_TINY) for w in found]


def _window_read_ms(seq: int, window: int, tiny: bool, device: torch.device, repeats: int) -> float:
    """Median time of reading a decoding step's K and V window once (a copy: read + write)."""
    shape = _TINY if tiny else GPU_SHAPE
    size = (shape["batch"], shape["kv_heads"], min(window, seq), shape["head_dim"])
    k, v = (torch.randn(size, device=device).to(shape["dtype"]) for _ in range(2))
    return time_interleaved([lambda: (k.clone(), v.clone())], repeats, device)[0] * 1e3


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib  # lazy: matplotlib is an optional extra, needed only for the PNG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    colour = {name: plt.get_cmap("tab10")(n % 10) for n, name in enumerate(names)}  # one colour per contender
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 4.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        timed = [r for r in rows if r["mode"] == mode and r["median_ms"] == r["median_ms"]]
        cases = list(dict.fromkeys(f"{r['case']} N={r['seq']}" for r in timed))
        contenders = list(dict.fromkeys(r["contender"] for r in timed))
        width = 0.8 / max(len(contenders), 1)
        for c, name in enumerate(contenders):
            values = {f"{r['case']} N={r['seq']}": r["median_ms"] for r in timed if r["contender"] == name}
            xs = [i + c * width for i, case in enumerate(cases) if case in values]
            ax.bar(xs, [values[case] for case in cases if case in values], width, label=name, color=colour[name])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, rotation=20, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"attnkit GPU table, {mode}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(out: Path, device: str, tiny: bool, budget: float, repeats: int, only: Optional[Sequence[str]]) -> dict:
    """Run the sections; returns (and writes) ``{"meta", "rows", "failures", "skipped", "decode_read_ms"}``."""
    console = Console(width=170)  # the table has ten columns; log files are not terminals
    start = time.monotonic()
    result = {
        "meta": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or device,
            "torch": torch.__version__, "tiny": tiny, "repeats": repeats,
        },
        "rows": [], "failures": [], "skipped": [], "decode_read_ms": {},
    }
    sections = [s for s in SECTIONS if not only or s[0] in only]
    for number, (case, seqs, backward) in enumerate(sections, 1):
        label = f"{case} {'fwd+bwd' if backward else 'fwd'} N={','.join(map(str, seqs))}"
        if time.monotonic() - start > budget:
            result["skipped"].append(label)
            console.print(f"[yellow]skipped (budget of {budget:.0f} s spent): {label}")
            continue
        with console.status(f"[{number}/{len(sections)}] {label}"):
            try:
                workloads = _workloads(case, seqs, tiny)
                rows = run_benchmark(workloads, repeats=repeats, backward=backward, device=device)
                if case == "gpu-decode":
                    for w in workloads:
                        result["decode_read_ms"][str(w.seq)] = _window_read_ms(w.seq, w.pattern.size, tiny, torch.device(device), repeats)
            except Exception as exc:  # one failing section must not cost the others
                result["failures"].append({"section": label, "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=6)})
                console.print(f"[red]failed: {label}: {type(exc).__name__}: {exc}")
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
        result["rows"].extend(r.as_dict() for r in rows)
        (out / "gpu_table.json").write_text(json.dumps(result, indent=2))  # partial results survive a kill
        try:
            console.print(rich_table(rows, label))
        except Exception as exc:  # a display problem must not cost the measured rows
            console.print(f"[red]could not show the table for {label}: {type(exc).__name__}: {exc}")
    result["meta"]["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_table.json").write_text(json.dumps(result, indent=2))
    if result["rows"]:
        _plot(result["rows"], out / "gpu_table.png")
    if result["decode_read_ms"]:
        console.print(f"reading the decode window's K and V once (copy): {result['decode_read_ms']} ms")
    console.print(f"wrote {out / 'gpu_table.json'} ({len(result['failures'])} failed, {len(result['skipped'])} skipped sections)")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.gpu_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_table.json and gpu_table.png")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (check the logic on a CPU)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds after which no section starts")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", action="append", metavar="CASE", help="run only these case sets (repeatable)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, args.device, args.tiny, args.budget, args.repeats, args.only)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
