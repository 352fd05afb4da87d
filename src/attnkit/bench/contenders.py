"""What a benchmark times: :class:`Contender`, torch SDPA as a user calls it, and attnkit's backends.

attnkit's contenders come from ``attnkit.BACKENDS``, so a backend added to the registry is timed
without a change here; each case set names the backends it leaves out, and says why.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import torch
import torch.nn.functional as F

from ..functional import BACKENDS, attention
from ..kernels.dense import sdpa_mask
from ..patterns import Pattern

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def sdpa_direct(pattern: Pattern) -> AttentionFn:
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


def attnkit_backend(pattern: Pattern, backend: str) -> AttentionFn:
    """``attnkit.attention`` with ``pattern`` on one named backend."""
    return lambda q, k, v: attention(q, k, v, pattern, backend=backend)


def backends_to_time(left_out: Collection[str]) -> list[str]:
    """The names in ``attnkit.BACKENDS`` not in ``left_out``, in registry order except
    ``reference``, which comes last: it is the slow explicit oracle."""
    kept = [name for name in BACKENDS if name not in left_out]
    return sorted(kept, key=lambda name: name == "reference")


__all__ = ["AttentionFn", "Contender", "attnkit_backend", "backends_to_time", "sdpa_direct"]
