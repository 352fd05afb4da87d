"""Sparse attention: run a plan of :mod:`~attnkit.kernels.sparse_plan` exactly, forward and backward.

Every group of units is one batched attention call: units become the "heads" of the call, the
``g`` query heads that share a KV head are stacked in each unit's rows (GQA without repeating K/V),
and the group's element mask is an additive ``-inf`` mask. Units are taken from the inputs as
strided views wherever their positions are evenly spaced (band blocks, residue classes, blocks),
so most plans gather nothing; other units are gathered with ``index_select``. Parts are merged by
their log-sum-exp. Cost and memory follow the pairs the units cover, never ``Nq x Nk``.

With ``native_bands=True`` (the caller decided that the native band kernel of
:mod:`~attnkit.kernels.band_native` runs these inputs: the sparse backend does, once per call),
band patterns (sliding windows and their compositions) and the band parts of plans (Strided's
local band) run that kernel; everything else runs a plan, with one of two executions:

- on CPU (and when the value width equals the key width) each group is one call of torch's fused
  CPU flash-attention kernel, which never writes the scores to memory. The backward pass is
  FlashAttention's: each group's backward kernel is given the *merged* output and LSE, so each part
  contributes exactly its share of dq, dk, dv with no extra pass for the LSE merge. A gradient that
  arrives through the returned LSE is handled by recomputing through the portable path;
- elsewhere the portable path: per chunk of units, explicit matmuls and an exp2 softmax,
  differentiated by autograd (only per-unit probabilities are saved). It keeps each part's row
  maximum and log-sum apart and merges relative to the largest maximum, with scores taken
  relative to each head's first key where all keys share it, so parts with huge tied scores
  merge exactly.

The fused path merges the parts' LSEs, whose last bit is a relative error of ``|lse| * eps`` in
the part weights; when that exceeds ``_MERGE_ERROR`` (float32 LSEs above 128, rare) the
call is rerun on the portable path.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..patterns import Pattern, finite_band, head_runs
from .band_native import band_backward, band_forward, band_native_attention
from .common import LOG2E, compute_dtype, kv_groups, merge_lse
from .documents import document_attention
from .score_mods import ScoreMod
from .sparse_plan import (
    BACKWARD_BAND_ROWS, BAND_ROWS, UNIT_ROWS, SparsePlan, UnitGroup, document_piece, plan_documents, plan_sparse,
)

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
CHUNK_SCORES = 1 << 21
"""Score entries the portable path computes at once (batch x KV heads x units x rows x keys)."""


# ---------------------------------------------------------------------------------------------
# Unit indices: views where positions are evenly spaced, gathers elsewhere.


def _arithmetic(index: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """``(start, unit_step, item_step)`` when ``index[u, m] == start + u*unit_step + m*item_step``
    with non-negative steps, else None."""
    units, items = index.shape
    start = int(index[0, 0])
    unit_step = int(index[1, 0]) - start if units > 1 else 0
    item_step = int(index[0, 1]) - start if items > 1 else 1
    if unit_step < 0 or item_step < 1:
        return None
    expected = start + unit_step * torch.arange(units, device=index.device)[:, None]
    expected = expected + item_step * torch.arange(items, device=index.device)
    return (start, unit_step, item_step) if torch.equal(expected, index) else None


class _UnitIndex:
    """The rows a group's units gather from and scatter to: an index table ``(U, M)`` of rows in
    ``[0, n)`` (others = padding), read and written as strided views where it is evenly spaced."""

    def __init__(self, index: torch.Tensor, n: int) -> None:
        self.index = index
        self.valid = (index >= 0) & (index < n)
        self.all_valid = bool(self.valid.all())
        self.lo, self.hi = int(index.min()), int(index.max())
        self.arith = _arithmetic(index)
        self.same_rows = index.shape[0] > 1 and bool((index == index[:1]).all())
        self.unique = bool(self.all_valid and index.unique().numel() == index.numel())
        self.flat_valid = self.valid.flatten().nonzero().flatten()
        self.flat_index = index.flatten()[self.flat_valid]

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x (B', n, D)`` as ``(B', U, M, D)``; padding rows read as zeros."""
        n = x.shape[1]
        first, last = max(self.lo, 0), min(self.hi, n - 1)
        window = x[:, first : last + 1]
        if self.lo < first or self.hi > last:
            window = F.pad(window, (0, 0, first - self.lo, self.hi - last))
        base = self.lo
        units, items = self.index.shape
        if self.arith is not None and window.stride(-1) == 1:
            start, unit_step, item_step = self.arith
            s0, s1 = window.stride(0), window.stride(1)
            return window.as_strided(
                (window.shape[0], units, items, window.shape[2]),
                (s0, unit_step * s1, item_step * s1, 1),
                window.storage_offset() + (start - base) * s1,
            )
        if self.same_rows:
            rows = window.index_select(1, self.index[0] - base)
            return rows.unsqueeze(1).expand(-1, units, -1, -1)
        return window.index_select(1, (self.index - base).flatten()).unflatten(1, (units, items))

    def write(self, target: torch.Tensor, values: torch.Tensor, accumulate: bool) -> None:
        """Store (or add) ``values (B', U, M, D)`` into ``target (B', n, D)``; padding is dropped."""
        if self.arith is not None and self.unique and target.is_contiguous():
            start, unit_step, item_step = self.arith
            s0, s1 = target.stride(0), target.stride(1)
            view = target.as_strided(
                values.shape, (s0, unit_step * s1, item_step * s1, 1), target.storage_offset() + start * s1
            )
            view.add_(values) if accumulate else view.copy_(values)
            return
        if (
            accumulate and self.arith is not None and self.all_valid and self.arith[1] > 0
            and self.arith[2] == 1 and target.is_contiguous()
        ):
            self._add_segments(target, values)
            return
        flat = values.flatten(1, 2)
        if not self.all_valid:
            flat = flat.index_select(1, self.flat_valid)
        if accumulate:
            target.index_add_(1, self.flat_index, flat.to(target.dtype))
        else:
            target.index_copy_(1, self.flat_index, flat.to(target.dtype))


    def _add_segments(self, target: torch.Tensor, values: torch.Tensor) -> None:
        """Add overlapping windows (units ``unit_step`` apart, consecutive items) as
        ``ceil(M / unit_step)`` adds of non-overlapping strided views."""
        start, unit_step, _ = self.arith
        s0, s1 = target.stride(0), target.stride(1)
        units, items = self.index.shape
        for first in range(0, items, unit_step):
            width = min(unit_step, items - first)
            view = target.as_strided(
                (target.shape[0], units, width, target.shape[2]),
                (s0, unit_step * s1, s1, 1),
                target.storage_offset() + (start + first) * s1,
            )
            view.add_(values[:, :, first : first + width])


def _unit_indices(group: UnitGroup, plan: SparsePlan) -> tuple[_UnitIndex, _UnitIndex]:
    if "indices" not in group.cache:
        group.cache["indices"] = (_UnitIndex(group.q_pos - plan.offset, plan.n_q), _UnitIndex(group.k_pos, plan.n_k))
    return group.cache["indices"]


def _additive_mask(group: UnitGroup, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1, U or 1, g*R, C)`` mask with ``-inf`` on blocked pairs, rows repeated per stacked head."""
    key = ("mask", groups, dtype)
    if key not in group.cache:
        blocked = group.blocked
        blocked = blocked.unsqueeze(1).expand(-1, groups, -1, -1).flatten(1, 2)
        mask = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
        group.cache[key] = mask.masked_fill_(blocked, float("-inf")).unsqueeze(0)
    return group.cache[key]


def _stack_heads(units: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B*Hq, U, R, D) -> (B*Hkv, U, g*R, D)``: the g query heads of a KV head share its units."""
    if groups == 1:
        return units
    b_hq, n_units, rows, dim = units.shape
    return units.view(b_hq // groups, groups, n_units, rows, dim).transpose(1, 2).reshape(
        b_hq // groups, n_units, groups * rows, dim
    )


def _unstack_heads(units: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`_stack_heads`."""
    if groups == 1:
        return units
    b_hkv, n_units, g_rows, dim = units.shape
    return units.view(b_hkv, n_units, groups, g_rows // groups, dim).transpose(1, 2).reshape(
        b_hkv * groups, n_units, g_rows // groups, dim
    )


# ---------------------------------------------------------------------------------------------
# Fused CPU execution with FlashAttention's backward.


def _part_buffers(q3, part, plan: SparsePlan, dim: int, dtype: torch.dtype):
    """Uninitialised ``(out (B', Nq, Dv), lse (B', Nq, 1))``; rows no unit writes get 0 / -inf."""
    out = q3.new_empty(q3.shape[0], plan.n_q, dim)
    lse = torch.empty((q3.shape[0], plan.n_q, 1), dtype=dtype, device=q3.device)
    covered = torch.zeros(plan.n_q, dtype=torch.bool, device=q3.device)
    for group in part:
        q_index, _ = _unit_indices(group, plan)
        covered[q_index.flat_index] = True
    missing = (~covered).nonzero().flatten()
    if len(missing):
        out.index_fill_(1, missing, 0.0)
        lse.index_fill_(1, missing, float("-inf"))
    return out, lse


def _fused_part(q3, k3, v3, part, plan: SparsePlan, scale: float, groups: int):
    """One part's ``(out (B*Hq, Nq, D), lse (B*Hq, Nq, 1))`` from its groups of units."""
    part_out, part_lse = _part_buffers(q3, part, plan, v3.shape[-1], compute_dtype(q3.dtype))
    for group in part:
        q_index, k_index = _unit_indices(group, plan)
        mask = _additive_mask(group, groups, q3.dtype)
        q_u = _stack_heads(q_index.read(q3), groups)
        out_u, lse_u = _FUSED(q_u, k_index.read(k3), k_index.read(v3), 0.0, False, attn_mask=mask, scale=scale)
        seen = group.seen.unsqueeze(0).expand(groups, -1, -1).transpose(0, 1).flatten(1)  # (U, g*R)
        lse_u = lse_u.to(part_lse.dtype).masked_fill(~seen, float("-inf"))
        q_index.write(part_out, _unstack_heads(out_u, groups), accumulate=False)
        q_index.write(part_lse, _unstack_heads(lse_u.unsqueeze(-1), groups), accumulate=False)
    return part_out, part_lse


def _fused_part_backward(q3, k3, v3, out3, lse3, d_out3, part, plan: SparsePlan, scale: float, groups: int, grads):
    """Add one part's share of dq, dk, dv to ``grads``; ``lse3 (B*Hq, Nq, 1)`` is the merged LSE
    with ``-inf`` replaced by 0 (those rows have p = 0)."""
    d_q, d_k, d_v = grads
    for group in part:
        q_index, k_index = _unit_indices(group, plan)
        mask = _additive_mask(group, groups, q3.dtype)
        q_u, d_out_u, out_u = (_stack_heads(q_index.read(t), groups) for t in (q3, d_out3, out3))
        lse_u = _stack_heads(q_index.read(lse3), groups).squeeze(-1).contiguous()
        d_q_u, d_k_u, d_v_u = _FUSED_BACKWARD(
            d_out_u, q_u, k_index.read(k3), k_index.read(v3), out_u, lse_u, 0.0, False,
            attn_mask=mask, scale=scale,
        )
        q_index.write(d_q, _unstack_heads(d_q_u, groups), accumulate=True)
        k_index.write(d_k, d_k_u, accumulate=True)
        k_index.write(d_v, d_v_u, accumulate=True)


def _native_bands(plan: SparsePlan, native_bands: bool) -> list:
    """Per part, the band the native kernel runs instead of the part's units (Strided's local
    band, say), else None."""
    return list(plan.bands) if native_bands and plan.bands else [None] * len(plan.parts)


def _fused_forward(q3, k3, v3, plan: SparsePlan, scale: float, groups: int, native_bands: bool):
    """``q3 (B*Hq, Nq, D)``, ``k3/v3 (B*Hkv, Nk, D)`` (contiguous) -> merged
    ``(out (B*Hq, Nq, D), lse (B*Hq, Nq))``."""
    outs, lses = [], []
    for part, band in zip(plan.parts, _native_bands(plan, native_bands)):
        if band is not None:
            part_out, part_lse = band_forward(q3, k3, v3, band, scale)
        else:
            part_out, part_lse = _fused_part(q3, k3, v3, part, plan, scale, groups)
            part_lse = part_lse.squeeze(-1)
        outs.append(part_out)
        lses.append(part_lse)
    return (outs[0], lses[0]) if len(outs) == 1 else merge_lse(outs, lses)


def _fused_backward(
    q3, k3, v3, out3, lse3, d_out3, plan: SparsePlan, scale: float, groups: int, native_bands: bool
):
    """dq, dk, dv of the merged attention: each part's backward sees the final out and LSE."""
    dtype = compute_dtype(q3.dtype)
    grads = tuple(torch.zeros(t.shape, dtype=dtype, device=q3.device) for t in (q3, k3, v3))
    native_bands = _native_bands(plan, native_bands)
    delta = (d_out3 * out3).sum(-1) if any(band is not None for band in native_bands) else None
    lse_masked = lse3.masked_fill(lse3 == float("-inf"), 0.0).unsqueeze(-1)
    for part, band in zip(plan.parts, native_bands):
        if band is not None:
            shares = band_backward(q3, k3, v3, lse3.contiguous(), d_out3.contiguous(), delta, band, scale)
            for total, share in zip(grads, shares):
                total.add_(share)
        else:
            _fused_part_backward(q3, k3, v3, out3, lse_masked, d_out3, part, plan, scale, groups, grads)
    return grads


class _FusedSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, backward_plan, scale, native_bands):
        batch, n_q_heads, n_q, dim = q.shape
        groups = kv_groups(q, k)
        q3, k3, v3 = (t.reshape(-1, t.shape[2], dim).contiguous() for t in (q, k, v))
        out, lse = _fused_forward(q3, k3, v3, plan, scale, groups, native_bands)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.backward_plan, ctx.scale, ctx.native_bands = plan, backward_plan, scale, native_bands
        return out.view(batch, n_q_heads, n_q, dim), lse.view(batch, n_q_heads, n_q)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if d_lse is not None and bool(d_lse.any()):
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                result = _portable(*leaves, ctx.plan, ctx.scale)
                grads = torch.autograd.grad(result, leaves, (d_out, d_lse))
            return (*grads, None, None, None, None)
        dim = q.shape[-1]
        d_q, d_k, d_v = _fused_backward(
            *(t.reshape(-1, t.shape[2], dim).contiguous() for t in (q, k, v)),
            out, lse, d_out.reshape(out.shape), ctx.backward_plan, ctx.scale, kv_groups(q, k), ctx.native_bands,
        )
        grads = d_q.view(q.shape).to(q.dtype), d_k.view(k.shape).to(k.dtype), d_v.view(v.shape).to(v.dtype)
        return (*grads, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# Portable execution (any device, any value width), differentiated by autograd.


def _chunks(x: torch.Tensor, index: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Rows ``index (U, m)`` of ``x (B, H, N, D)`` as ``(B, H, u, m, D)`` chunks of ``chunk`` units.
    Under autograd the gather is done once and split (a cheap backward); else chunk by chunk."""
    units, per_unit = index.shape
    flat = index.flatten()
    if torch.is_grad_enabled() and x.requires_grad:
        yield from x.index_select(2, flat).unflatten(2, (units, per_unit)).split(chunk, dim=2)
        return
    for start in range(0, units, chunk):
        part = flat[start * per_unit : (start + chunk) * per_unit]
        yield x.index_select(2, part).unflatten(2, (-1, per_unit))


def _portable_group(q_flat, k, v, group: UnitGroup, plan: SparsePlan, groups: int, score_mod=None):
    """One group: ``(out (B, Hkv, U*g*R, Dv), row_max, log_sum, destination rows)``, the row
    statistics ``(B, Hkv, U*g*R)`` in base 2 (``row_max`` -inf on rows that saw no key, where
    ``log_sum`` is 0); ``q_flat (B, Hkv, g*Nq, D)`` is pre-scaled by ``scale * log2(e)``.
    ``score_mod`` modifies each unit's scores at its absolute positions, before the mask."""
    n_q = plan.n_q
    units, rows_per_unit = group.q_pos.shape
    n_cols = group.k_pos.shape[1]
    rows = group.q_pos - plan.offset
    real = (rows >= 0) & (rows < n_q)
    heads = torch.arange(groups, device=rows.device)[None, :, None] * n_q
    safe_rows = rows.clamp(0, n_q - 1)[:, None, :] + heads  # (U, g, R)
    dest = torch.where(real[:, None, :], safe_rows, groups * n_q).flatten()
    k_index = group.k_pos.clamp(0, plan.n_k - 1)
    batch, kv_heads = k.shape[:2]
    chunk = max(1, CHUNK_SCORES // max(1, batch * kv_heads * groups * rows_per_unit * n_cols))  # batch may be 0
    blocked = group.blocked.unsqueeze(1)  # (U or 1, 1, R, C)
    outs, maxes, log_sums = [], [], []
    inputs = zip(_chunks(q_flat, safe_rows.flatten(1), chunk), _chunks(k, k_index, chunk), _chunks(v, k_index, chunk))
    for start, (q_u, k_u, v_u) in zip(range(0, units, chunk), inputs):
        scores = torch.matmul(q_u, k_u.transpose(-1, -2))  # (B, Hkv, u, g*R, C)
        if score_mod is not None:
            units_here = slice(start, start + scores.shape[2])
            by_unit = scores.unflatten(3, (groups, rows_per_unit)).transpose(1, 2)  # (B, u, Hkv, g, R, C)
            by_unit = score_mod.scores(by_unit, group.q_pos[units_here], group.k_pos[units_here], LOG2E)
            scores = by_unit.transpose(1, 2).flatten(3, 4)
        unit_blocked = blocked if blocked.shape[0] == 1 else blocked[start : start + chunk]
        scores.view(*scores.shape[:3], groups, rows_per_unit, n_cols).masked_fill_(unit_blocked, float("-inf"))
        row_max = scores.detach().amax(-1, keepdim=True)
        unseen = row_max == float("-inf")
        probs = scores.sub_(row_max.masked_fill(unseen, 0.0)).exp2_()
        row_sum = probs.sum(-1)
        safe_sum = torch.where(row_sum > 0, row_sum, 1.0)
        outs.append(torch.matmul(probs, v_u) / safe_sum.unsqueeze(-1))
        maxes.append(row_max.squeeze(-1))
        log_sums.append(torch.log2(safe_sum))
    parts = (torch.cat(t, dim=2).flatten(2, 3) for t in (outs, maxes, log_sums))
    return (*parts, dest)


def _merge_by_maxima(outs, maxes, log_sums) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE merge of parts given as (row max, log2 of the sum below it) pairs in base 2:
    ``(out, lse2)``. Weights ``2^(max_i - max + log_sum_i)`` are taken relative to the largest
    maximum and never pass through a rounded LSE, so parts that share their maximum keep their
    exact proportions however large the scores (a float32 LSE of 4e8 has no bits left for the
    log of the sum)."""
    if len(outs) == 1:
        return outs[0], torch.where(maxes[0] == float("-inf"), maxes[0], maxes[0] + log_sums[0])
    top = torch.stack(maxes).amax(0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = [torch.exp2(m - top + s) for m, s in zip(maxes, log_sums)]  # 0 where a part saw nothing
    total = sum(weights)
    seen = total > 0
    safe = torch.where(seen, total, 1.0)
    out = sum((w / safe).unsqueeze(-1) * o for w, o in zip(weights, outs))
    return out, torch.where(seen, top + torch.log2(safe), float("-inf"))


def _shared_key(k: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, 1, D)``: each head's first key where the keys share it as a large component (no
    entry of any key differs from it by more than an eighth of the largest entry), else zeros.

    Softmax ignores a per-row constant, so scores may be taken relative to this key: keys that
    share a large component (equal keys, at the extreme) then give small scores whose rounding no
    longer depends on how each unit's matmul orders its sums, and the constant returns in the
    LSE. Shifting keys that do not share it would add the rounding of ``q . k_ref`` to every
    score (an outlier first key, like an attention sink, would spoil rows that never see it), and
    a NaN or inf in it would reach every row: such heads are not shifted."""
    k_ref, values = k[:, :, :1], k.detach()
    spread = (values - values[:, :, :1]).abs().amax((2, 3), keepdim=True)
    largest = values.abs().amax((2, 3), keepdim=True)
    shared = torch.isfinite(spread) & (spread * 8 <= largest)  # False where NaN
    return torch.where(shared, k_ref, torch.zeros((), dtype=k.dtype, device=k.device))


def _portable(q, k, v, plan: SparsePlan, scale: float, score_mod: Optional[ScoreMod] = None):
    """``(out, lse)`` of the plan by explicit matmuls, differentiable by autograd (in the score
    mod's parameter too)."""
    dtype = compute_dtype(q.dtype)
    batch, n_q_heads, n_q, _ = q.shape
    kv_heads, groups = k.shape[1], kv_groups(q, k)
    q_flat = (q.to(dtype) * (scale * LOG2E)).reshape(batch, kv_heads, groups * n_q, q.shape[-1])
    k, v = k.to(dtype), v.to(dtype)
    # Shifting every score of a row by the same amount is exact only where the mod adds to it.
    k_ref = _shared_key(k) if score_mod is None or score_mod.additive else torch.zeros_like(k[:, :, :1])
    row_offset = (q_flat * k_ref).sum(-1).reshape(batch, n_q_heads, n_q)
    k = k - k_ref
    outs, maxes, log_sums = [], [], []
    for part in plan.parts:
        out = q_flat.new_zeros(batch, kv_heads, groups * n_q + 1, v.shape[-1])  # last row: padding
        row_max = q_flat.new_full((batch, kv_heads, groups * n_q + 1), float("-inf"))
        log_sum = q_flat.new_zeros((batch, kv_heads, groups * n_q + 1))
        for group in part:
            group_out, group_max, group_log_sum, dest = _portable_group(q_flat, k, v, group, plan, groups, score_mod)
            out = out.index_copy(2, dest, group_out)
            row_max = row_max.index_copy(2, dest, group_max)
            log_sum = log_sum.index_copy(2, dest, group_log_sum)
        outs.append(out[:, :, :-1].reshape(batch, n_q_heads, n_q, v.shape[-1]))
        maxes.append(row_max[:, :, :-1].reshape(batch, n_q_heads, n_q))
        log_sums.append(log_sum[:, :, :-1].reshape(batch, n_q_heads, n_q))
    out, lse2 = _merge_by_maxima(outs, maxes, log_sums)
    # A row that saw no key keeps LSE -inf, and no gradient of it reaches q or k through the offset.
    unseen = lse2 == float("-inf")
    lse2 = torch.where(unseen, lse2, lse2 + row_offset.masked_fill(unseen, 0.0))
    return out.to(q.dtype), lse2 / LOG2E


_MERGE_ERROR = 2.0**-16
"""Largest relative error of the part weights the fused path may make by merging rounded LSEs
(``|lse| * eps`` of the LSE's dtype, 1.5e-5): beyond it the portable path merges by row maxima.
In float32 that is ``|lse| > 128``, above the LSEs of ordinary attention, so the rerun (a second
forward pass, and autograd's backward instead of the fused one) stays rare."""


def _merge_imprecise(plan: SparsePlan, lse: torch.Tensor) -> bool:
    """Whether merging the parts' rounded LSEs lost precision: the LSEs are so large that their
    last bit outweighs ``_MERGE_ERROR`` (float32 LSEs above 128)."""
    if len(plan.parts) < 2 or lse.numel() == 0:
        return False
    lse = lse.detach()
    if lse.device.type == "cpu":  # numpy: no thread pool for a pass over (B, H, Nq)
        values = lse.numpy()
        largest = float(np.abs(values[values != -np.inf]).max(initial=0.0))
    else:
        largest = float(lse.masked_fill(lse == float("-inf"), 0.0).abs().amax())
    return largest * torch.finfo(lse.dtype).eps > _MERGE_ERROR


# ---------------------------------------------------------------------------------------------
# Heads and the kernel entry point.


def _run(
    q, k, v, pattern: Pattern, scale: float, unit_rows: int, native_bands: bool, score_mod: Optional[ScoreMod]
) -> tuple[torch.Tensor, torch.Tensor]:
    n_q, n_k, device = q.shape[2], k.shape[2], q.device
    band = finite_band(pattern) if native_bands else None
    if band is not None:
        return band_native_attention(q, k, v, band, scale, *([score_mod] if score_mod is not None else []))
    documents = document_piece(pattern)
    if documents is not None:
        if score_mod is not None:  # the sparse backend refuses such calls (facts.documents_with_score_mod)
            raise ValueError("sparse_kernel: no score_mod on Document patterns yet")
        return document_attention(q, k, v, plan_documents(documents, n_q, n_k), scale, native_bands=native_bands)
    plan = plan_sparse(pattern, n_q, n_k, device, unit_rows, min(unit_rows, BAND_ROWS))
    # torch's fused kernel takes no score modification: the units' scores are computed here.
    fused = _FUSED is not None and device.type == "cpu" and v.shape[-1] == q.shape[-1] and score_mod is None
    if not fused:
        return _portable(q, k, v, plan, scale, score_mod)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        backward_plan = plan_sparse(pattern, n_q, n_k, device, unit_rows, min(unit_rows, BACKWARD_BAND_ROWS))
    else:
        backward_plan = plan
    out, lse = _FusedSparseAttention.apply(q, k, v, plan, backward_plan, scale, native_bands)
    if _merge_imprecise(plan, lse):  # rare (huge scores): rerun, merging by exact row maxima
        return _portable(q, k, v, plan, scale)
    return out, lse


def sparse_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    *,
    native_bands: bool = False,
    unit_rows: int = UNIT_ROWS,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by the sparse planner. Inputs validated: q ``(B, Hq, Nq, D)``,
    k ``(B, Hkv, Nk, D)``, v ``(B, Hkv, Nk, Dv)``. Returns ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``
    (lse float32 for float16/bfloat16 inputs). Differentiable in q, k, v through out and lse.

    ``native_bands``: run bands with finite bounds (a head's whole pattern, or a part of its plan)
    by the native band kernel, whose :func:`~.band_native.band_native_takes` the caller has
    checked for these inputs; it is the caller's decision (the sparse backend's), not this
    kernel's. ``unit_rows`` bounds the query block of the plan's units (see
    :func:`~.sparse_plan.plan_sparse`); the backward pass uses larger band units than the forward pass.
    ``score_mod`` (softcap, alibi, distance_bias: :mod:`.score_mods`) runs in the native band
    kernel for bands, and in the planner's portable execution otherwise (autograd gives its
    parameter's gradient).
    """
    groups = kv_groups(q, k)
    outs, lses = [], []
    for first, stop, head_pat in head_runs(pattern, q.shape[1], groups):
        kv = slice(first // groups, -(-stop // groups))
        head_mod = None if score_mod is None else score_mod.for_heads(first, stop)
        out, lse = _run(q[:, first:stop], k[:, kv], v[:, kv], head_pat, scale, unit_rows, native_bands, head_mod)
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def sparse_plan_pairs(pattern: Pattern, n_q: int, n_k: int, n_q_heads: int = 1) -> int:
    """Score entries the sparse plan computes per batch, summed over ``n_q_heads`` query heads."""
    total = 0
    for first, stop, head_pat in head_runs(pattern, n_q_heads, 1):
        documents = document_piece(head_pat)
        if documents is not None:
            total += (stop - first) * plan_documents(documents, n_q, n_k).computed_pairs
            continue
        plan = plan_sparse(head_pat, n_q, n_k, torch.device("cpu"), UNIT_ROWS, BAND_ROWS)  # the forward plan
        total += (stop - first) * plan.computed_pairs
    return total


__all__ = ["sparse_kernel", "sparse_plan_pairs"]
