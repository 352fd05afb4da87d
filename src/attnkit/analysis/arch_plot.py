"""PNGs for ``attnkit arch``: the attention vs MLP share of decode compute, and KV-cache bytes of a layer
mix against an all-global model, as the context grows."""

from __future__ import annotations

from pathlib import Path

from .plots import _pyplot


def plot_compute_shares(shares: list[dict], title: str, path: Path) -> None:
    """Stacked shares (attention, mlp, head) of per-token decode FLOPs against context (log x)."""
    plt = _pyplot()
    contexts = [row["context"] for row in shares]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stackplot(contexts, [[100 * row[k] for row in shares] for k in ("attention", "mlp", "head")],
                 labels=["attention (projections + scores)", "MLP (SwiGLU)", "vocabulary head"], alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(contexts[0], contexts[-1])
    ax.set_ylim(0, 100)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("share of FLOPs per decoded token, %")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kv_by_context(rows: list[dict], title: str, path: Path) -> None:
    """KV-cache bytes (bf16) of a layer mix and of the all-global model against context (log-log),
    from :func:`attnkit.analysis.gemma_costs.kv_rows`."""
    plt = _pyplot()
    contexts = [row["context"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(contexts, [row["all_global"] / 2**20 for row in rows], marker="o", label="all layers global")
    ax.plot(contexts, [row["mixed"] / 2**20 for row in rows], marker="o",
            label="window layers (rolling cache) + global layers")
    for row in rows:
        ax.annotate(f"{row['ratio']:.1f}x", (row["context"], row["mixed"] / 2**20), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache per sequence, MiB (bf16)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
