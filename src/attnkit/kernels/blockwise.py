"""Tiled attention with an online softmax over key/value tiles, and the LSE merge.

The keys are cut into tiles of ``tile`` columns. For each tile only the query rows that can see at
least one of its keys are computed, so a causal pattern does about half the work of the square and
a sliding window does work proportional to the band. Element masks are applied only to the rows of
a tile where the pattern is partial. Extra memory is ``O(Nq * tile)`` per (batch, head): no
``Nq x Nk`` tensor is ever allocated, forward or backward.

The backward pass is written by hand in the FlashAttention style: it recomputes each tile's
probabilities from the saved log-sum-exp instead of storing them, and it also propagates a gradient
that arrives through the returned LSE (needed when partial results are merged, as ring attention
does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..patterns import Pattern, query_key_positions
from .common import compute_dtype, head_mask, kv_groups

DEFAULT_TILE = 512


@dataclass(frozen=True)
class TileStep:
    """Key columns ``[k_start, k_stop)`` against query rows ``[q_start, q_stop)``.

    ``masked_rows`` lists the row ranges inside ``[q_start, q_stop)`` where the pattern is partial
    and an element mask must be applied; every other row of the step sees all the tile's keys.
    """

    k_start: int
    k_stop: int
    q_start: int
    q_stop: int
    masked_rows: tuple[tuple[int, int], ...]


def _clamp_int(x: float, lo: int, hi: int) -> int:
    return int(min(max(x, lo), hi))


def plan_tiles(pattern: Pattern, n_q: int, n_k: int, tile: int) -> list[TileStep]:
    """The steps of the blockwise kernel: which tiles to compute, on which rows, with which masks.

    Tiles with no allowed pair are left out. Band patterns (Full, Causal, SlidingWindow) are
    planned in closed form; other patterns evaluate their predicate one tile at a time.
    """
    offset = n_k - n_q  # query row r sits at position r + offset
    band = pattern.band() if pattern.n_heads is None else None
    steps = []
    q_pos, k_pos = query_key_positions(n_q, n_k)
    for k_start in range(0, n_k, tile):
        k_stop = min(k_start + tile, n_k)
        if band is not None:
            lo, hi = band
            # Rows that see some key of the tile: lo <= p - j <= hi for a j in the tile.
            q_start = _clamp_int(k_start + lo - offset, 0, n_q)
            q_stop = _clamp_int(k_stop - 1 + hi - offset + 1, 0, n_q)
            if q_start >= q_stop:
                continue
            # Rows that see every key of the tile.
            full_start = _clamp_int(k_stop - 1 + lo - offset, q_start, q_stop)
            full_stop = _clamp_int(k_start + hi - offset + 1, q_start, q_stop)
            if full_start >= full_stop:
                masked = ((q_start, q_stop),)
            else:
                masked = tuple(
                    r for r in ((q_start, full_start), (full_stop, q_stop)) if r[0] < r[1]
                )
        else:
            allowed = pattern.rows_mask(q_pos, k_pos[k_start:k_stop])  # (..., n_q, tile)
            rows = allowed.reshape(-1, n_q, k_stop - k_start).any(-1).any(0).nonzero()
            if len(rows) == 0:
                continue
            q_start, q_stop = int(rows[0]), int(rows[-1]) + 1
            masked = () if bool(allowed[..., q_start:q_stop, :].all()) else ((q_start, q_stop),)
        steps.append(TileStep(k_start, k_stop, q_start, q_stop, masked))
    return steps


def _tile_scores(
    q_scaled: torch.Tensor,
    k: torch.Tensor,
    step: TileStep,
    pattern: Pattern,
    n_q_heads: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Masked scaled scores of one step: ``(B, Hkv, g, rows, cols)`` in ``dtype``."""
    n_q, n_k, groups = q_scaled.shape[3], k.shape[2], q_scaled.shape[2]
    k_tile = k[:, :, step.k_start : step.k_stop].unsqueeze(2)  # (B, Hkv, 1, T, D)
    scores = torch.matmul(q_scaled[..., step.q_start : step.q_stop, :], k_tile.transpose(-1, -2))
    scores = scores.to(dtype)
    for start, stop in step.masked_rows:
        allowed = head_mask(
            pattern, n_q, n_k, n_q_heads, k.device, groups,
            q_rows=slice(start, stop), k_cols=slice(step.k_start, step.k_stop),
        )
        rows = scores[..., start - step.q_start : stop - step.q_start, :]
        rows.masked_fill_(~allowed, float("-inf"))
    return scores


def _forward(q, k, v, pattern, scale, steps):
    dtype = compute_dtype(q.dtype)
    batch, n_q_heads, n_q, _ = q.shape
    n_kv_heads, d_v = k.shape[1], v.shape[-1]
    q_scaled = (q * scale).unflatten(1, (n_kv_heads, kv_groups(q, k)))  # (B, Hkv, g, Nq, D)
    stats_shape = q_scaled.shape[:-1]
    acc = torch.zeros(*stats_shape, d_v, dtype=dtype, device=q.device)
    row_max = torch.full(stats_shape, float("-inf"), dtype=dtype, device=q.device)
    row_sum = torch.zeros(stats_shape, dtype=dtype, device=q.device)
    for step in steps:
        rows = slice(step.q_start, step.q_stop)
        probs = _tile_scores(q_scaled, k, step, pattern, n_q_heads, dtype)
        old_max = row_max[..., rows]
        new_max = torch.maximum(old_max, probs.amax(-1))
        shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
        probs.sub_(shift.unsqueeze(-1)).exp_()
        correction = torch.exp(old_max - shift)
        row_sum[..., rows] = row_sum[..., rows] * correction + probs.sum(-1)
        v_tile = v[:, :, step.k_start : step.k_stop].unsqueeze(2)
        acc_rows = acc[..., rows, :]
        acc_rows.mul_(correction.unsqueeze(-1)).add_(torch.matmul(probs.to(v.dtype), v_tile))
        row_max[..., rows] = new_max
    seen = row_sum > 0
    lse = torch.where(seen, row_max + torch.log(torch.where(seen, row_sum, 1.0)), float("-inf"))
    out = acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def _backward(q, k, v, out, lse, d_out, d_lse, pattern, scale, steps):
    dtype = compute_dtype(q.dtype)
    n_q_heads, n_kv_heads = q.shape[1], k.shape[1]
    groups = kv_groups(q, k)
    q_scaled = (q * scale).unflatten(1, (n_kv_heads, groups))
    d_out_g = d_out.unflatten(1, (n_kv_heads, groups))
    # delta_i = sum_j p_ij dP_ij = rowsum(dO * O); a gradient on the LSE enters as -dLSE.
    delta = (d_out.to(dtype) * out.to(dtype)).sum(-1) - d_lse.to(dtype)
    delta = delta.unflatten(1, (n_kv_heads, groups))
    lse_g = lse.to(dtype).unflatten(1, (n_kv_heads, groups))
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), 0.0)  # such rows are fully masked: p = 0
    d_q = torch.zeros(q_scaled.shape, dtype=dtype, device=q.device)
    d_k = torch.zeros(k.shape, dtype=dtype, device=q.device)
    d_v = torch.zeros(v.shape, dtype=dtype, device=q.device)
    for step in steps:
        rows, cols = slice(step.q_start, step.q_stop), slice(step.k_start, step.k_stop)
        probs = _tile_scores(q_scaled, k, step, pattern, n_q_heads, dtype)
        probs.sub_(lse_g[..., rows].unsqueeze(-1)).exp_()
        d_out_rows = d_out_g[..., rows, :]
        d_v[:, :, cols] += torch.matmul(probs.transpose(-1, -2).to(v.dtype), d_out_rows).sum(2)
        v_tile = v[:, :, cols].unsqueeze(2)
        d_scores = torch.matmul(d_out_rows, v_tile.transpose(-1, -2)).to(dtype)
        d_scores.sub_(delta[..., rows].unsqueeze(-1)).mul_(probs)
        d_scores = d_scores.to(q.dtype)
        d_q[..., rows, :] += torch.matmul(d_scores, k[:, :, cols].unsqueeze(2))
        d_k[:, :, cols] += torch.matmul(d_scores.transpose(-1, -2), q_scaled[..., rows, :]).sum(2)
    d_q = (d_q * scale).flatten(1, 2)
    return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, steps):
        out, lse = _forward(q, k, v, pattern, scale, steps)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale, ctx.steps = pattern, scale, steps
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = _backward(q, k, v, out, lse, d_out, d_lse, ctx.pattern, ctx.scale, ctx.steps)
        return (*grads, None, None, None)


def blockwise_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    tile: int = DEFAULT_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by KV tiles. Inputs validated: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``,
    v ``(B, Hkv, Nk, Dv)``. Returns ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``; lse is float32 for
    float16/bfloat16 inputs. Differentiable in q, k, v, through out and through lse.
    """
    steps = plan_tiles(pattern, q.shape[2], k.shape[2], min(tile, k.shape[2]))
    return _BlockwiseAttention.apply(q, k, v, pattern, scale, steps)


def merge_lse(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention results over disjoint key sets into the result over their union.

    Args:
        outs: partial outputs, each ``(B, H, Nq, Dv)``.
        lses: their log-sum-exps, each ``(B, H, Nq)``; ``-inf`` marks a row that saw no key.
    Returns:
        ``(out, lse)`` with ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) * out_i``;
        rows that saw no key in any part give zeros and ``-inf``. Differentiable (finite gradients
        on such rows too). ``out`` keeps the dtype of ``outs[0]``; weights are computed in the
        dtype of the LSEs.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"merge_lse: outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}"
        )
    lse_stack = torch.stack(list(lses))  # (P, B, H, Nq)
    top = lse_stack.amax(0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(lse_stack - top)
    total = weights.sum(0)
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    weights = weights / torch.where(seen, total, 1.0)
    out = sum(w.unsqueeze(-1) * o.to(w.dtype) for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), lse


__all__ = ["DEFAULT_TILE", "TileStep", "blockwise_kernel", "merge_lse", "plan_tiles"]
