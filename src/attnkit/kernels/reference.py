"""The seed's two steps, written out plainly: the ground truth every other kernel is tested against.

Step 1, relevance scoring: ``scores = q @ k^T * scale``, disallowed pairs masked out, softmax over
keys. Step 2, combination: ``out = weights @ v``. The full ``(B, Hq, Nq, Nk)`` weight matrix is
materialised on purpose, so this kernel is for checking and explaining, not for long sequences.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..patterns import Pattern, query_key_positions
from .common import allowed_mask, compute_dtype, kv_groups
from .score_mods import ScoreMod


def reference_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    *,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit attention.

    Args:
        q: ``(B, Hq, Nq, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``, validated.
        positions: ``(q_pos (Nq,), k_pos (Nk,))`` absolute positions, default bottom-right.
        key_padding_mask: ``(B, Nk)`` bool, True = a real key; padding keys are hidden.
        score_mod: applied to the scores before masking (see :mod:`.score_mods`); autograd
            differentiates it, parameters included.
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
    if score_mod is not None:
        scores = score_mod.scores(scores, *_positions_of(positions, n_q, n_k, q.device))
    allowed = allowed_mask(pattern, n_q, n_k, q.device, group, positions, key_padding_mask)  # broadcasts
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


def _positions_of(positions, n_q: int, n_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return query_key_positions(n_q, n_k, device) if positions is None else positions


def explicit_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_lse: Optional[torch.Tensor],
    allowed: torch.Tensor,
    scale: float,
    score_mod: Optional[ScoreMod] = None,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The share of ``(dq, dk, dv)`` through the keys ``k``/``v`` given the merged ``out (B, Hq,
    Nq, Dv)`` and ``lse (B, Hq, Nq)`` of a larger key set, written out over the whole square:
    ``p = exp(t - lse)`` on the ``allowed`` pairs (broadcasting to ``(B, Hkv, g, Nq, Nk)``) with
    ``t`` the (modified, by ``score_mod`` at ``positions``, default bottom-right) scores,
    ``dv = p^T dO``, ``dt = p (dO v^T - delta)`` with ``delta = rowsum(dO * out) - d_lse``, and
    ``ds = dt * t'(s)``. Returns ``(dq, dk, dv)`` in the inputs' dtypes (computed in float32 for
    half inputs) and the score mod's parameter gradient (None when it has none)."""
    dtype = compute_dtype(q.dtype)
    n_kv_heads, group = k.shape[1], kv_groups(q, k)
    grouped = lambda t: t.to(dtype).unflatten(1, (n_kv_heads, group))  # noqa: E731
    qg, out_g, d_out_g = grouped(q), grouped(out), grouped(d_out)
    kg, vg = k.to(dtype).unsqueeze(2), v.to(dtype).unsqueeze(2)
    lse_g = grouped(lse)
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), 0.0)  # such rows see no key: p = 0
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale
    if score_mod is not None:
        positions = _positions_of(positions, q.shape[2], k.shape[2], q.device)
        modified = score_mod.scores(scores, *positions)
    else:
        modified = scores
    probs = torch.exp(modified - lse_g.unsqueeze(-1))
    probs = probs.masked_fill(~allowed, 0.0)
    delta = (d_out_g * out_g).sum(-1)
    if d_lse is not None:
        delta = delta - grouped(d_lse)
    d_scores = probs * (torch.matmul(d_out_g, vg.transpose(-1, -2)) - delta.unsqueeze(-1))
    d_parameter = None
    if score_mod is not None:
        d_scores, d_parameter = score_mod.backward(scores, d_scores, *positions)
    d_q = torch.matmul(d_scores, kg).flatten(1, 2) * scale
    d_k = torch.matmul(d_scores.transpose(-1, -2), qg).sum(2) * scale
    d_v = torch.matmul(probs.transpose(-1, -2), d_out_g).sum(2)
    if d_parameter is not None:
        d_parameter = d_parameter.to(score_mod.parameter.dtype)
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype), d_parameter
