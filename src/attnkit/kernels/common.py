"""Small helpers shared by the kernels: dtypes, GQA grouping and pattern masks shaped for them."""

from __future__ import annotations

import torch

from ..patterns import Pattern, query_key_positions

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics stay in float32 for float16/bfloat16; float64 stays float64."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def kv_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head (``Hq // Hkv``); query head ``h`` uses KV head ``h // groups``."""
    return q.shape[1] // k.shape[1]


def head_mask(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    n_q_heads: int,
    device: torch.device,
    groups: int,
    q_rows: slice = slice(None),
    k_cols: slice = slice(None),
) -> torch.Tensor:
    """The pattern's mask for rows ``q_rows`` and columns ``k_cols`` of an ``n_q x n_k`` problem,
    shaped to broadcast against grouped scores ``(B, Hkv, g, rows, cols)``.
    """
    q_pos, k_pos = query_key_positions(n_q, n_k, device)
    allowed = pattern.rows_mask(q_pos[q_rows], k_pos[k_cols])
    if pattern.n_heads is None:
        return allowed  # (rows, cols) broadcasts over batch and heads
    return allowed.reshape(n_q_heads // groups, groups, *allowed.shape[-2:])
