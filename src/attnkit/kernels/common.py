"""Small helpers shared by the kernels: dtypes, GQA grouping and pattern masks shaped for them."""

from __future__ import annotations

import torch

from ..patterns import Pattern

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics stay in float32 for float16/bfloat16; float64 stays float64."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def kv_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head (``Hq // Hkv``); query head ``h`` uses KV head ``h // groups``."""
    return q.shape[1] // k.shape[1]


def head_mask(pattern: Pattern, n_q: int, n_k: int, device: torch.device, groups: int) -> torch.Tensor:
    """The pattern's ``n_q x n_k`` mask shaped to broadcast against grouped scores
    ``(B, Hkv, g, n_q, n_k)``: ``(n_q, n_k)``, or ``(Hkv, g, n_q, n_k)`` for per-head patterns."""
    allowed = pattern.mask(n_q, n_k, device=device)
    if pattern.n_heads is None:
        return allowed
    return allowed.unflatten(0, (pattern.n_heads // groups, groups))
