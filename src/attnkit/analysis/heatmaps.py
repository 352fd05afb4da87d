"""Attention-weight heatmaps as PNG files: one layer's heads, and every layer x head at once.

Rows are query tokens (the token doing the looking), columns are key tokens (the tokens looked
at); each row sums to one. A chosen (layer, head) is framed so the picture matches the text output.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from .plots import _pyplot

_CMAP = "Blues"
_HIGHLIGHT = "#d62728"


def _plain(labels: Sequence[str]) -> list[str]:
    """Labels matplotlib shows as typed (a ``$`` would otherwise start math mode)."""
    return [label.replace("$", r"\$") for label in labels]


def _frame(ax, color: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def plot_layer_heads(
    weights: torch.Tensor,
    labels: Sequence[str],
    layer: int,
    path: Path,
    *,
    chosen_head: Optional[int] = None,
    chosen_token: Optional[int] = None,
) -> Path:
    """Write one heatmap per head of a layer, four to a row.

    Args:
        weights: ``(H, N, N)`` attention weights of the layer (query rows, key columns).
        labels: ``N`` token labels for both axes.
        layer: layer index, for the title.
        path: the PNG to write.
        chosen_head: head to frame in red; ``chosen_token`` marks its query row there.
    Returns ``path``.
    """
    plt = _pyplot()
    labels = _plain(labels)
    n_heads, n = weights.shape[0], weights.shape[-1]
    cols = min(4, n_heads)
    rows = math.ceil(n_heads / cols)
    side = max(2.6, 0.32 * n + 1.2)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 0.8, rows * side + 0.6), squeeze=False,
                             layout="constrained")
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= n_heads:
            ax.axis("off")
            continue
        image = ax.imshow(weights[h].float().numpy(), cmap=_CMAP, vmin=0.0, vmax=1.0)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
        chosen = h == chosen_head
        ax.set_title(f"head {h}", fontsize=9, color=_HIGHLIGHT if chosen else "black",
                     fontweight="bold" if chosen else "normal")
        if chosen:
            _frame(ax, _HIGHLIGHT, 2.5)
            if chosen_token is not None:
                ax.add_patch(plt.Rectangle((-0.5, chosen_token - 0.5), n, 1, fill=False,
                                           edgecolor=_HIGHLIGHT, linewidth=1.5))
    fig.suptitle(f"layer {layer}: attention weights of each head (rows: query token, columns: key token)",
                 fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all_layers(
    weights: Sequence[torch.Tensor],
    labels: Sequence[str],
    path: Path,
    *,
    chosen: Optional[tuple[int, int]] = None,
) -> Path:
    """Write a grid of every layer (rows) x head (columns) of the attention weights.

    Args:
        weights: one ``(H, N, N)`` tensor per layer.
        labels: ``N`` token labels, shown on the first column's axes only.
        path: the PNG to write.
        chosen: ``(layer, head)`` to frame in red.
    Returns ``path``.
    """
    plt = _pyplot()
    n_layers, n_heads = len(weights), weights[0].shape[0]
    n = weights[0].shape[-1]
    cell = 1.25
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(n_heads * cell + 1.0, n_layers * cell + 0.8),
                             squeeze=False)
    for li in range(n_layers):
        for h in range(n_heads):
            ax = axes[li][h]
            ax.imshow(weights[li][h].float().numpy(), cmap=_CMAP, vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
            if chosen == (li, h):
                _frame(ax, _HIGHLIGHT, 2.5)
    sentence = " ".join(_plain(labels))
    sentence = sentence if len(sentence) <= 90 else sentence[:87] + "..."
    fig.suptitle(f"attention weights, every layer x head ({n} tokens: {sentence})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
