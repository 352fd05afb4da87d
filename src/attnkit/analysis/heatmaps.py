"""Attention-weight heatmaps as PNG files, drawn from the explain dict: one layer's heads, and every
layer x head at once.

Rows are the held query tokens (every token for a short text: the token doing the looking),
columns the key tokens (the tokens looked at); each row sums to one. Keys the layer's pattern
hides from a row are hatched grey, never drawn as a zero weight. Heads that share keys and values
(GQA, MQA) are drawn side by side under the KV head they share, and a layer's pattern is named
when the layers differ. The head the text explains is framed in red.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .plots import _pyplot

_CMAP = "Blues"
_HIGHLIGHT = "#d62728"
_HIDDEN = dict(facecolor="#e4e4e4", edgecolor="#a8a8a8", hatch="////", linewidth=0.0)
_MAX_TICKS = 16
HIDDEN_NOTE = "hatched: keys the pattern hides from that row (not a zero weight)"


def _plain(labels: Sequence[str]) -> list[str]:
    """Labels matplotlib shows as typed (a ``$`` would otherwise start math mode)."""
    return [label.replace("$", r"\$") for label in labels]


def _frame(ax, color: str, width: float) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _ticks(positions: Sequence[int], labels: Sequence[str]) -> tuple[list[int], list[str]]:
    """At most :data:`_MAX_TICKS` tick indices into ``positions`` and their labels (``i:label``
    when some are left out, or when the positions are not 0, 1, 2, ...)."""
    step = math.ceil(len(positions) / _MAX_TICKS)
    index = list(range(0, len(positions), step))
    numbered = step > 1 or list(positions) != list(range(len(positions)))
    names = _plain([labels[positions[i]] for i in index])
    return index, [f"{positions[i]}:{name}" if numbered else name for i, name in zip(index, names)]


def _draw(ax, weights: np.ndarray, allowed: np.ndarray):
    """One head: ``weights (R, N)`` with hidden cells left transparent over a hatched background."""
    plt = _pyplot()
    rows, n = weights.shape
    ax.add_patch(plt.Rectangle((-0.5, -0.5), n, rows, zorder=0, **_HIDDEN))
    shown = np.ma.masked_array(weights, mask=~allowed)
    return ax.imshow(shown, cmap=_CMAP, vmin=0.0, vmax=1.0, aspect="auto" if rows != n else "equal",
                     interpolation="nearest", zorder=1)


def _layer_arrays(data: dict, layer: int) -> tuple[np.ndarray, np.ndarray]:
    step1 = data["step1"]
    return step1["weights"][layer].float().numpy(), step1["allowed"][layer].numpy()


def plot_layer_heads(data: dict, layer: int, path: Path) -> Path:
    """Write one heatmap per head of ``layer`` of the explain dict ``data``; the explained head
    (``data["head"]``) is framed, with the explained token's row marked. GQA/MQA: one row of
    panels per KV head (four to a row for MHA). Returns ``path``."""
    plt = _pyplot()
    model, tokens = data["model"], data["tokens"]["labels"]
    rows, n = data["rows"], len(tokens)
    weights, allowed = _layer_arrays(data, layer)
    n_heads, group = model["n_heads"], model["n_heads"] // model["n_kv_heads"]
    cols = group if model["attention"] == "GQA" and group <= 6 else min(4, n_heads)
    grid_rows = math.ceil(n_heads / cols)
    width = max(2.8, 0.32 * min(n, 48) + 1.4)
    height = width if len(rows) == n else max(1.4, 0.32 * len(rows) + 1.2)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(cols * width + 1.0, grid_rows * height + 1.0),
                             squeeze=False, layout="constrained")
    x_index, x_names = _ticks(range(n), tokens)
    y_index, y_names = _ticks(rows, tokens)
    image = None
    for h in range(grid_rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= n_heads:
            ax.axis("off")
            continue
        image = _draw(ax, weights[h], allowed[h])
        ax.set_xticks(x_index, x_names, rotation=90, fontsize=8)
        ax.set_yticks(y_index, y_names, fontsize=8)
        chosen = h == data["head"]
        kv = f" · KV {h // group}" if model["attention"] != "MHA" else ""
        ax.set_title(f"head {h}{kv}", fontsize=10, color=_HIGHLIGHT if chosen else "black",
                     fontweight="bold" if chosen else "normal")
        if chosen:
            _frame(ax, _HIGHLIGHT, 2.5)
            r = rows.index(data["token"])
            ax.add_patch(plt.Rectangle((-0.5, r - 0.5), n, 1, fill=False, edgecolor=_HIGHLIGHT, linewidth=1.5, zorder=2))
    pattern = data["layers"][layer]["pattern"]
    fig.suptitle(f"layer {layer} ({pattern}): attention weights of each head, {model['heads']}\n"
                 f"rows: query token, columns: key token; {HIDDEN_NOTE}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all_layers(data: dict, path: Path) -> Path:
    """Write :func:`all_layers_figure` of the explain dict ``data`` to ``path``; returns it."""
    fig = all_layers_figure(data)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def all_layers_figure(data: dict):
    """Every layer (rows) x head (columns) of the explain dict ``data`` as one matplotlib figure.

    Many layers are split into side-by-side blocks so the picture stays roughly square; heads
    sharing a KV head sit together under its label; token labels sit on the outer axes (every
    few tokens, with their positions, for a long text), layer labels name the layer's pattern
    when the layers differ, a colour bar and a note (hatching, the red frame) close it.
    """
    plt = _pyplot()
    model, labels = data["model"], data["tokens"]["labels"]
    n_layers, n_heads, n = model["n_layers"], model["n_heads"], len(labels)
    group, grouped = n_heads // model["n_kv_heads"], model["attention"] != "MHA"
    patterns = [layer["pattern"] for layer in data["layers"]]
    named = len(set(patterns)) > 1
    blocks = max(1, round(math.sqrt(n_layers / n_heads)))
    per_block = math.ceil(n_layers / blocks)
    x_index, x_names = _ticks(range(n), labels)
    y_index, y_names = _ticks(data["rows"], labels)
    # Inches, laid out by hand: a layout engine over hundreds of axes takes seconds.
    cell = 1.1
    cell_h = cell if data["every_row"] else max(0.45, min(cell, 0.12 * len(data["rows"])))
    gap, group_gap = 0.07, 0.22 if grouped else 0.07
    tick_in = 0.075 * max(len(name) for name in x_names + y_names) + 0.2
    left_in = tick_in + (0.75 if named else 0.45)
    block_w = n_heads * cell + (n_heads - 1) * gap + (model["n_kv_heads"] - 1) * (group_gap - gap)
    top, bottom, right = 0.95 + (0.25 if grouped else 0.0), tick_in + 0.7, 1.2
    width = blocks * (left_in + block_w) + right
    height = top + per_block * (cell_h + gap) + bottom
    fig = plt.figure(figsize=(width, height))
    weights, allowed = data["step1"]["weights"].float().numpy(), data["step1"]["allowed"].numpy()
    image = None
    for li in range(n_layers):
        block, row = divmod(li, per_block)
        last_row = row == per_block - 1 or li == n_layers - 1
        for h in range(n_heads):
            x = block * (left_in + block_w) + left_in + h * (cell + gap) + (h // group) * (group_gap - gap)
            y = height - top - (row + 1) * (cell_h + gap)
            ax = fig.add_axes((x / width, y / height, cell / width, cell_h / height))
            image = _draw(ax, weights[li, h], allowed[li, h])
            ax.set_xticks(x_index if last_row else [])
            ax.set_yticks(y_index if h == 0 else [])
            if last_row:
                ax.set_xticklabels(x_names, rotation=90, fontsize=7.5)
            if h == 0:
                ax.set_yticklabels(y_names, fontsize=7.5)
                ax.set_ylabel(f"layer {li}" + (f"\n{patterns[li]}" if named else ""), fontsize=10)
            ax.tick_params(length=1.5, pad=1)
            if row == 0:
                ax.set_title(f"head {h}", fontsize=9.5)
                if grouped and h % group == 0:
                    centre = x + (group * (cell + gap) - gap) / 2
                    fig.text(centre / width, (y + cell_h + 0.32) / height, f"KV head {h // group}",
                             ha="center", va="bottom", fontsize=9.5, fontweight="bold")
            if (li, h) == (data["layer"], data["head"]):
                _frame(ax, _HIGHLIGHT, 2.5)
    sentence = " ".join(_plain(labels))
    sentence = sentence if len(sentence) <= 90 else sentence[:87] + "..."
    fig.suptitle(f"attention weights, every layer × head: {Path(model['name']).name}, {model['heads']} "
                 f"({n} tokens: {sentence})", fontsize=10.5, y=1 - 0.12 / height, va="top")
    bar = fig.add_axes((1 - 0.85 / width, bottom / height, 0.15 / width, 1 - (top + bottom) / height))
    fig.colorbar(image, cax=bar, label="attention weight (each row sums to 1)")
    note = "Each square is one head: row = the query token (the one looking), column = the key token (the one looked at)."
    if not allowed.all():
        note += f" {HIDDEN_NOTE[0].upper()}{HIDDEN_NOTE[1:]}."
    note += f" Red frame: the head explained in the text (layer {data['layer']}, head {data['head']})."
    fig.text(0.5, 0.1 / height, note, ha="center", va="bottom", fontsize=9, color=_HIGHLIGHT)
    return fig
