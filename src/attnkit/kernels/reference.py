"""The seed's two steps, written out plainly: the ground truth every other kernel is tested against.

Step 1, relevance scoring: ``scores = q @ k^T * scale``, disallowed pairs masked out, softmax over
keys. Step 2, combination: ``out = weights @ v``. The full ``(B, Hq, Nq, Nk)`` weight matrix is
materialised on purpose, so this kernel is for checking and explaining, not for long sequences.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from .common import compute_dtype, head_mask, kv_groups


def reference_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit attention.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``, validated.
    Returns:
        ``(out, lse, weights)``: out ``(B, Hq, Nq, Dv)`` in q's dtype, lse ``(B, Hq, Nq)`` float32
        (float64 for float64 inputs), weights ``(B, Hq, Nq, Nk)`` in the compute dtype. Float16 and
        bfloat16 inputs are computed in float32. Fully masked rows give zero weights, zero output
        and lse ``-inf``.
    """
    dtype = compute_dtype(q.dtype)
    n_q = q.shape[2]
    n_k = k.shape[2]
    group = kv_groups(q, k)
    qg = q.to(dtype).unflatten(1, (k.shape[1], group))  # (B, Hkv, g, Nq, D)
    kg = k.to(dtype).unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    vg = v.to(dtype).unsqueeze(2)

    # Step 1: relevance scores, masked to the pattern, then softmax over the keys.
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # (B, Hkv, g, Nq, Nk)
    allowed = head_mask(pattern, n_q, n_k, q.device, group)  # broadcasts to scores
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(-1, keepdim=True)
    # A row with no allowed key would softmax to NaN; give it zero scores, then zero weights.
    safe_scores = torch.where(row_has_key, scores, torch.zeros((), dtype=dtype, device=q.device))
    weights = torch.where(row_has_key, torch.softmax(safe_scores, dim=-1), 0.0)
    lse = torch.where(row_has_key.squeeze(-1), torch.logsumexp(safe_scores, dim=-1), float("-inf"))

    # Step 2: every query's output is the weighted sum of the value vectors.
    out = torch.matmul(weights, vg)  # (B, Hkv, g, Nq, Dv)
    return (
        out.flatten(1, 2).to(q.dtype),
        lse.flatten(1, 2),
        weights.flatten(1, 2),
    )
