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
        labels: ``N`` token labels, on the first column's rows and the last row's columns (every
            few tokens when the sentence is long, with their positions).
        path: the PNG to write.
        chosen: ``(layer, head)`` to frame in red; a note under the grid says what the frame is.
    Returns ``path``.
    """
    fig = all_layers_figure(weights, labels, chosen=chosen)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


_MAX_TICKS = 16


def all_layers_figure(
    weights: Sequence[torch.Tensor],
    labels: Sequence[str],
    *,
    chosen: Optional[tuple[int, int]] = None,
):
    """The matplotlib figure :func:`plot_all_layers` writes (arguments as there)."""
    plt = _pyplot()
    n_layers, n_heads = len(weights), weights[0].shape[0]
    n = weights[0].shape[-1]
    step = math.ceil(n / _MAX_TICKS)
    ticks = list(range(0, n, step))
    names = _plain(labels)
    names = [names[i] if step == 1 else f"{i}:{names[i]}" for i in ticks]
    # Margins in inches, laid out by hand: a layout engine over dozens of axes takes seconds.
    cell, labels_in = 1.25, 0.075 * max(len(name) for name in names) + 0.15
    left, right, top, bottom = labels_in + 0.45, 1.1, 0.55, labels_in + 0.45
    width, height = n_heads * cell + left + right, n_layers * cell + top + bottom
    fig, axes = plt.subplots(n_layers, n_heads, squeeze=False, figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.08, hspace=0.08)
    for li in range(n_layers):
        for h in range(n_heads):
            ax = axes[li][h]
            image = ax.imshow(weights[li][h].float().numpy(), cmap=_CMAP, vmin=0.0, vmax=1.0)
            ax.set_xticks(ticks if li == n_layers - 1 else [])
            ax.set_yticks(ticks if h == 0 else [])
            if li == n_layers - 1:
                ax.set_xticklabels(names, rotation=90, fontsize=6)
            if h == 0:
                ax.set_yticklabels(names, fontsize=6)
            ax.tick_params(length=1.5, pad=1)
            if li == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
            if chosen == (li, h):
                _frame(ax, _HIGHLIGHT, 2.5)
    sentence = " ".join(_plain(labels))
    sentence = sentence if len(sentence) <= 90 else sentence[:87] + "..."
    fig.suptitle(f"attention weights, every layer x head ({n} tokens: {sentence})", fontsize=9,
                 y=1 - 0.15 / height)
    bar = fig.add_axes((1 - 0.8 / width, bottom / height, 0.15 / width, 1 - (top + bottom) / height))
    fig.colorbar(image, cax=bar, label="attention weight (each row sums to 1)")
    note = ("Each square is one head: row = the query token (the one looking), column = the key token "
            "(the one looked at), in the order of the labels.")
    if chosen is not None:
        note += f" Red frame: the head explained in the text (layer {chosen[0]}, head {chosen[1]})."
    fig.text(0.5, 0.12 / height, note, ha="center", va="bottom", fontsize=8,
             color=_HIGHLIGHT if chosen is not None else "black")
    return fig
