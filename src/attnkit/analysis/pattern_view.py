"""Look at a pattern: a terminal rendering, matplotlib figures, and what it costs to compute.

``render(pattern, n)`` draws the ``n x n`` mask with one character per pair (``#`` allowed, ``.``
not), query rows top to bottom. ``block_costs`` compares, at a long length, the share of the
``N x N`` square that a block mask visits (every ``block x block`` block holding an allowed pair,
as FlexAttention computes) with the share the sparse planner computes and the share allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..kernels.sparse import sparse_plan_pairs
from ..patterns import Pattern
from .plots import _pyplot

MAX_RENDER = 96  # wider renderings wrap in a terminal


def render(pattern: Pattern, n: int) -> str:
    """The ``n x n`` mask as text, one line per query (``#`` = may attend)."""
    if not 1 <= n <= MAX_RENDER:
        raise ValueError(f"-n must be between 1 and {MAX_RENDER} to render in a terminal, got {n}")
    mask = pattern.mask(n, n)
    return "\n".join("".join("#" if a else "." for a in row) for row in mask.tolist())


@dataclass(frozen=True)
class BlockCosts:
    """Shares of the ``n x n`` square: allowed pairs, pairs in the block mask's non-empty
    blocks, and score entries of the sparse plan; ``blocks``/``blocks_total`` count blocks."""

    n: int
    block: int
    allowed: float
    block_mask: float
    sparse_plan: float
    blocks: int
    blocks_total: int


def block_costs(pattern: Pattern, n: int, block: int = 128) -> BlockCosts:
    """What a block mask of ``block x block`` blocks and attnkit's sparse plan compute at length ``n``."""
    layout = pattern.block_layout(n, n, block)
    starts = torch.arange(0, n, block)
    sizes = (starts + block).clamp(max=n) - starts  # the last block may be partial
    block_pairs = int((layout.double() * (sizes[:, None] * sizes[None, :])).sum())
    square = n * n
    return BlockCosts(
        n=n,
        block=block,
        allowed=pattern.density(n),
        block_mask=block_pairs / square,
        sparse_plan=sparse_plan_pairs(pattern, n, n) / square,
        blocks=int(layout.sum()),
        blocks_total=layout.numel(),
    )


def _draw(ax, pattern: Pattern, n: int, title: str) -> None:
    ax.imshow(pattern.mask(n, n).numpy(), cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"{title}\ndensity {pattern.density(n):.1%}", fontsize=10)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")


def save_figure(named: Sequence[tuple[str, Pattern]], n: int, path: Path) -> None:
    """One ``n x n`` mask per ``(title, pattern)``, side by side, as a PNG at ``path``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(named), figsize=(3.6 * len(named), 3.9), squeeze=False)
    for ax, (title, pattern) in zip(axes[0], named):
        _draw(ax, pattern, n, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["BlockCosts", "block_costs", "render", "save_figure"]
