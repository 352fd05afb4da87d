"""Per-head patterns: the pattern each query head uses, and runs of heads that share one.

Kernels run patterns without a head dimension; a per-head pattern (:class:`PerHead`, a per-head
:class:`BlockSparse`, or a composition holding one) is split here into runs of equal heads, so
heads that share a pattern share one kernel call and one cached plan.
"""

from __future__ import annotations

import torch

from .base import Pattern
from .blocks import BlockSparse
from .compose import PerHead


class _HeadOfBlockSparse(BlockSparse):
    """One head of a per-head :class:`BlockSparse`; equal to any head with the same layout, so
    heads that share a layout share one run and one cached plan."""

    def __init__(self, parent: BlockSparse, head: int) -> None:
        super().__init__(parent.layout[head], parent.block_size)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSparse) and other.n_heads is None and (
            other.block_size == self.block_size and torch.equal(other.layout, self.layout)
        )

    def __hash__(self) -> int:
        return hash((self.block_size, self.layout.shape, bytes(self.layout.flatten().numpy())))


def head_pattern(pattern: Pattern, head: int) -> Pattern:
    """The pattern query head ``head`` uses, without a head dimension."""
    if pattern.n_heads is None:
        return pattern
    if isinstance(pattern, PerHead):
        return pattern.patterns[head]
    if isinstance(pattern, BlockSparse):
        return _HeadOfBlockSparse(pattern, head)
    return type(pattern)(head_pattern(pattern.left, head), head_pattern(pattern.right, head))


def head_runs(pattern: Pattern, n_q_heads: int, groups: int) -> list[tuple[int, int, Pattern]]:
    """``(first, stop, pattern)``: runs of query heads that share one pattern; a run covers whole
    KV groups when it can, else single heads."""
    if pattern.n_heads is None:
        return [(0, n_q_heads, pattern)]
    per_head = [head_pattern(pattern, h) for h in range(n_q_heads)]
    runs, start = [], 0
    for h in range(1, n_q_heads + 1):
        if h == n_q_heads or per_head[h] != per_head[start]:
            if start % groups == 0 and h % groups == 0:
                runs.append((start, h, per_head[start]))
            else:
                runs.extend((i, i + 1, per_head[i]) for i in range(start, h))
            start = h
    return runs
