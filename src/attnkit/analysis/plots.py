"""Matplotlib figures for results people would rather see than read (PNG, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # matplotlib is the optional "viz" extra
        raise ImportError('plots need matplotlib: pip install "attnkit[viz]"') from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bench(rows: Sequence, path: Path) -> None:
    """Median time against sequence length, one line per (case, contender), log-log axes."""
    plt = _pyplot()
    series = defaultdict(list)
    for r in rows:
        series[(r.case, r.contender)].append((r.seq, r.median_ms))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (case, contender), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{case}: {contender}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(f"median time, ms ({rows[0].mode})")
    ax.set_title("attnkit bench")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
