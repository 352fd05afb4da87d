"""Tables (rich) and plots (matplotlib PNG) of a lab comparison produced by
:func:`attnkit.lab.experiment.run_comparison`."""

from __future__ import annotations

import statistics
from pathlib import Path


def _bytes(n: float) -> str:
    return f"{n / 1024:,.2f} KiB" if n >= 1024 else f"{n:,.1f} B"


def tables(result: dict) -> list:
    """One rich Table per task: quality (mean ± std over seeds, [min, max]) next to the costs."""
    from rich.table import Table

    out = []
    for task_name, entry in result["tasks"].items():
        metric = entry["metric"]
        first = next(iter(entry["variants"].values()))
        context = first["cost"]["context"]
        dtype_bytes = first["cost"]["kv_dtype_bytes"]
        better = "higher" if metric == "accuracy" else "lower"
        table = Table(title=f"{task_name}: validation {metric} ({better} is better), {len(first['runs'])} seeds",
                      caption=f"KV B/tok: dense cache, {8 * dtype_bytes}-bit; kept: what the layer patterns can "
                              f"still read at context {context:,}; decode tok/s at that context, batch 1")
        for column in ("variant", "KV heads", "params", "KV B/tok", "kept", f"{metric} mean", "± std",
                       "min..max", "train tok/s", "decode tok/s"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        fmt = "{:.3f}" if metric == "accuracy" else "{:.4f}"
        for name, v in entry["variants"].items():
            s, c = v["summary"], v["cost"]
            table.add_row(
                name, str(v["n_kv_heads"]), f"{c['parameters']:,}", _bytes(c["kv_bytes_per_token"]),
                _bytes(c["kv_bytes_per_token_at_context"]), fmt.format(s["mean"]), fmt.format(s["std"]),
                f"{fmt.format(s['min'])}..{fmt.format(s['max'])}",
                f"{s['train_tokens_per_s']:,.0f}", f"{c['decode_tokens_per_s']:,.1f}",
            )
        out.append(table)
    return out


def _task_panels(result: dict):
    """A figure with one panel per task: ``(fig, [(ax, task_name, entry), ...])`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    return fig, [(ax, name, entry) for ax, (name, entry) in zip(axes[0], tasks.items())]


def _finish_panel(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_kv(result: dict, path: Path) -> None:
    """Final validation quality (mean, error bar = std over seeds) against KV bytes per token kept
    at the decode context, one panel per task."""
    fig, panels = _task_panels(result)
    for ax, task_name, entry in panels:
        for index, (name, v) in enumerate(entry["variants"].items()):
            x = v["cost"]["kv_bytes_per_token_at_context"]
            ax.errorbar(x, v["summary"]["mean"], yerr=v["summary"]["std"], fmt="o", capsize=4,
                        color=f"C{index % 10}", label=name)
        ax.set_xscale("log")
        context = next(iter(entry["variants"].values()))["cost"]["context"]
        _finish_panel(ax, f"KV-cache bytes per token kept at context {context:,}", f"validation {entry['metric']}",
                      f"{task_name}: quality vs KV cache")
    _save(fig, f"attnkit lab ({result['preset']}): mean ± std over seeds", path)


def plot_quality_vs_tokens(result: dict, path: Path) -> None:
    """Validation quality against training tokens seen, one line per variant (mean over seeds,
    shaded min..max), one panel per task."""
    fig, panels = _task_panels(result)
    for ax, task_name, entry in panels:
        metric = entry["metric"]
        for index, (name, v) in enumerate(entry["variants"].items()):
            tokens = [p["tokens"] for p in v["runs"][0]["history"]]
            per_point = list(zip(*[[p[metric] for p in run["history"]] for run in v["runs"]]))
            mean = [statistics.fmean(values) for values in per_point]
            ax.plot(tokens, mean, color=f"C{index % 10}", label=name)
            ax.fill_between(tokens, [min(values) for values in per_point], [max(values) for values in per_point],
                            color=f"C{index % 10}", alpha=0.12)
        if metric == "loss":  # the first evaluation (untrained, ~ln vocab) would flatten every curve
            curves = [[p["loss"] for p in v["runs"][0]["history"]] for v in entry["variants"].values()]
            if all(len(c) > 2 for c in curves):
                ax.set_ylim(min(min(c) for c in curves) * 0.98, max(c[1] for c in curves) * 1.02)
        _finish_panel(ax, "training tokens", f"validation {metric}", f"{task_name}: learning curves")
    _save(fig, f"attnkit lab ({result['preset']}): mean over seeds, shaded min..max", path)
