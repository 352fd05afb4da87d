"""What ``attnkit bench`` measures: workloads (pattern and shapes) and the contenders run on them.

A case set maps a name to a function ``seqs -> [Workload]``; ``contenders_for`` lists every
implementation that can run a workload, attnkit's backends and the peers, side by side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..functional import attention
from ..kernels.dense import sdpa_mask
from ..patterns import Causal, Pattern

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

REFERENCE_MAX_SEQ = 2048  # the explicit reference materialises (B, H, N, N) weights
DEFAULT_SEQS = (1024, 4096, 8192)
QUICK_SEQS = (256, 1024)


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


@dataclass(frozen=True)
class Contender:
    """An implementation to time. ``baseline`` marks the one ratios are taken against."""

    name: str
    fn: Optional[AttentionFn]
    baseline: bool = False
    note: Optional[str] = None
    forward_only: bool = False
    """No backward pass here: left out of ``--backward`` runs. ``fn=None``: skipped (see note)."""
    compiled: bool = False
    """torch.compile'd code: dispatch modes cannot observe it, so its largest tensor is not measured."""


def _sdpa_direct(pattern: Pattern) -> AttentionFn:
    """torch SDPA called as a user would: ``is_causal``, or a boolean mask built once per shape."""

    @functools.lru_cache(maxsize=8)
    def masks(n_q: int, n_k: int, device: torch.device):
        return sdpa_mask(pattern, n_q, n_k, device)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        is_causal, mask = masks(q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1]
        )

    return run


def _attnkit(pattern: Pattern, backend: str) -> AttentionFn:
    return lambda q, k, v: attention(q, k, v, pattern, backend=backend)


def contenders_for(workload: Workload) -> list[Contender]:
    """Every implementation that can run ``workload``, the SDPA baseline first."""
    if workload.case in SPARSE_CASE_SETS:
        return sparse_contenders(workload)
    if workload.case in GPU_CASE_SETS:
        return gpu_contenders(workload)
    pattern = workload.pattern
    found = [Contender("torch sdpa", _sdpa_direct(pattern), baseline=True)]
    for backend in ("auto", "dense", "blockwise"):
        found.append(Contender(f"attnkit {backend}", _attnkit(pattern, backend)))
    if workload.seq <= REFERENCE_MAX_SEQ:
        found.append(Contender("attnkit reference", _attnkit(pattern, "reference")))
    return found


def causal_case(seqs: tuple[int, ...]) -> list[Workload]:
    """The foundation workload: causal, B=1, H=8, D=64, float32."""
    return [Workload("causal", Causal(), seq) for seq in seqs]


from .sparse_cases import SPARSE_CASE_SETS, sparse_contenders  # noqa: E402  (they build on the above)
from .gpu_cases import GPU_CASE_SETS, gpu_contenders  # noqa: E402

CASE_SETS: dict[str, Callable[[tuple[int, ...]], list[Workload]]] = {
    "causal": causal_case,
    **SPARSE_CASE_SETS,
    **GPU_CASE_SETS,
}
