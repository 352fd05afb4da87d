"""One attention problem to benchmark: a pattern and the shapes and dtype of ``q``, ``k``, ``v``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import Pattern


@dataclass(frozen=True)
class Workload:
    """One attention problem: ``q (batch, heads, seq, head_dim)``, k/v with ``kv_heads`` heads."""

    case: str
    pattern: Pattern
    seq: int
    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: torch.dtype = torch.float32

    @property
    def allowed_pairs(self) -> int:
        """Allowed (query, key) pairs over all batches and heads."""
        return self.pattern.count(self.seq, self.seq) * self.batch * self.heads

    @property
    def useful_flops(self) -> int:
        """Multiply-adds of the two matmuls restricted to allowed pairs, as FLOPs (forward)."""
        return 4 * self.head_dim * self.allowed_pairs

    def inputs(self, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.batch, self.heads, self.seq, self.head_dim, generator=gen)
        k = torch.randn(self.batch, self.kv_heads, self.seq, self.head_dim, generator=gen)
        v = torch.randn(self.batch, self.kv_heads, self.seq, self.head_dim, generator=gen)
        return tuple(t.to(device=device, dtype=self.dtype) for t in (q, k, v))  # type: ignore[return-value]
