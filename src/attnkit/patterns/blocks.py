"""Block-sparse patterns: whole blocks of positions allowed by a boolean layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..checks import positive_int
from .base import Pattern


@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Pairs whose block ``(i // block_size, j // block_size)`` is True in ``layout``.

    ``layout`` is a square bool tensor ``[n_blocks, n_blocks]`` (one layout for every head) or
    ``[n_heads, n_blocks, n_blocks]`` (one per query head); blocks are cut at absolute positions
    ``0, block_size, 2 * block_size, ...``. The layout must match the sequence: attention over
    ``n_k`` keys needs ``n_blocks == ceil(n_k / block_size)`` (query positions are absolute, so
    they use the same blocks). Queries at negative positions (``n_q > n_k``) see nothing. Patterns
    are compared by identity, as the layout is a tensor.
    """

    layout: torch.Tensor
    block_size: int
    n_heads: Optional[int] = field(init=False, default=None)

    def __post_init__(self) -> None:
        positive_int("BlockSparse", "block_size", self.block_size)
        layout = self.layout
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"BlockSparse: layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dim() not in (2, 3) or layout.shape[-1] != layout.shape[-2] or layout.numel() == 0:
            raise ValueError(
                "BlockSparse: layout must be a non-empty square [n_blocks, n_blocks] or "
                f"[n_heads, n_blocks, n_blocks] tensor, got shape {tuple(layout.shape)}"
            )
        object.__setattr__(self, "layout", (layout != 0).to("cpu").contiguous())
        object.__setattr__(self, "n_heads", layout.shape[0] if layout.dim() == 3 else None)

    @property
    def parts(self) -> tuple["BlockSparse"]:
        return (self,)

    @property
    def n_blocks(self) -> int:
        return self.layout.shape[-1]

    def validate(self, n_q: int, n_k: int) -> None:
        expected = -(-n_k // self.block_size)
        if expected != self.n_blocks:
            raise ValueError(
                f"BlockSparse: layout of shape {tuple(self.layout.shape)} with block_size "
                f"{self.block_size} does not match {n_k} keys (needs {expected} x {expected} blocks)"
            )

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        limit = self.n_blocks * self.block_size
        largest = max((int(t.max()) for t in (i, j) if t.numel()), default=-1)
        if largest >= limit:
            raise ValueError(
                f"BlockSparse: layout of shape {tuple(self.layout.shape)} with block_size "
                f"{self.block_size} covers positions below {limit}, got position {largest}"
            )
        layout = self.layout.to(i.device)
        i_block = (i // self.block_size).clamp(min=0)
        j_block = (j // self.block_size).clamp(min=0)
        if self.n_heads is None:
            allowed = layout[i_block, j_block]
        else:
            allowed = layout[:, i_block, j_block]
        return allowed & (i >= 0) & (j >= 0)
