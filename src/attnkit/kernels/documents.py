"""Packed documents: run a :class:`~.sparse_plan.DocumentPlan` exactly, forward and backward.

Each group of equally sized documents is one batched call: its units (documents) are gathered
into the batch dimension, ``(U * B, H, L, D)`` (a single document is a slice, copied contiguous),
and each unit is plain band attention over its own keys. No work crosses a document and nothing
is ``Nq x Nk``: the largest buffers are the inputs, the outputs and one group's copies.

One of three kernels runs a group, chosen per group:

- the native band kernel (:mod:`.band_native`), when the caller decided it runs these inputs
  (``native_bands``, the sparse backend's decision): any band, and a gradient through the LSE;
- torch's fused CPU flash-attention kernel for causal or full documents (any float dtype on the
  CPU); its backward is FlashAttention's, given the group's output and LSE;
- otherwise, and for a gradient that arrives through the returned LSE where the native kernel
  does not run, the blockwise kernel (:mod:`.blockwise`) on the group's band.

Every query row lies in exactly one document, so the groups write disjoint rows (and disjoint
keys' gradients): no merge of partial results is needed.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..patterns import Piece, query_key_positions
from .band_native import band_backward, band_forward
from .blockwise import blockwise_grads, blockwise_kernel
from .common import compute_dtype
from .sparse_plan import DocumentGroup, DocumentPlan

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _rows(group: DocumentGroup, starts: tuple[int, ...], length: int, device: torch.device) -> torch.Tensor:
    """Flat index ``(U * length,)`` of the units' rows, cached per group and device."""
    key = (starts is group.q_starts, device)
    if key not in group.cache:
        first = torch.tensor(starts, dtype=torch.long, device=device)
        group.cache[key] = (first[:, None] + torch.arange(length, device=device)).flatten()
    return group.cache[key]


def _take(x: torch.Tensor, group: DocumentGroup, queries: bool) -> torch.Tensor:
    """The group's rows of ``x (B, H, N, ...)`` as a contiguous ``(U * B, H, L, ...)``."""
    starts, length = (group.q_starts, group.n_q) if queries else (group.k_starts, group.n_k)
    if len(starts) == 1:
        return x.narrow(2, starts[0], length).contiguous()
    picked = x.index_select(2, _rows(group, starts, length, x.device))  # (B, H, U * L, ...)
    picked = picked.unflatten(2, (len(starts), length)).movedim(2, 0)  # (U, B, H, L, ...)
    return picked.reshape(-1, *picked.shape[2:]).contiguous()  # a view when L == 1: the kernels need rows


def _put(target: torch.Tensor, group: DocumentGroup, values: torch.Tensor, queries: bool) -> None:
    """Inverse of :func:`_take`: store ``values (U * B, H, L, ...)`` into ``target (B, H, N, ...)``."""
    starts, length = (group.q_starts, group.n_q) if queries else (group.k_starts, group.n_k)
    if len(starts) == 1:
        target.narrow(2, starts[0], length).copy_(values)
        return
    values = values.unflatten(0, (len(starts), -1)).movedim(0, 2).flatten(2, 3)  # (B, H, U * L, ...)
    target.index_copy_(2, _rows(group, starts, length, target.device), values.to(target.dtype))


def _flash_causal(group: DocumentGroup, dtype: torch.dtype, device: torch.device) -> Optional[bool]:
    """``is_causal`` for torch's fused kernel when it runs this group exactly, else None."""
    if _FUSED is None or device.type != "cpu":
        return None
    if group.causal():
        return True
    return False if group.full() else None


def _forward_group(q_u, k_u, v_u, group: DocumentGroup, scale: float, native: bool):
    if native:
        return band_forward(q_u, k_u, v_u, group.band, scale)
    causal = _flash_causal(group, q_u.dtype, q_u.device)
    if causal is not None and v_u.shape[-1] == q_u.shape[-1]:
        out, lse = _FUSED(q_u, k_u, v_u, 0.0, causal, attn_mask=None, scale=scale)
        return out, lse
    with torch.no_grad():
        return blockwise_kernel(q_u, k_u, v_u, Piece(*group.band), scale)


def _backward_group(q_u, k_u, v_u, out_u, lse_u, d_out_u, d_lse_u, delta_u, group: DocumentGroup, scale, native):
    if native:
        return band_backward(q_u, k_u, v_u, lse_u, d_out_u, delta_u, group.band, scale)
    causal = _flash_causal(group, q_u.dtype, q_u.device)
    if causal is not None and d_lse_u is None and v_u.shape[-1] == q_u.shape[-1]:
        lse_u = lse_u.masked_fill(lse_u == float("-inf"), 0.0).to(torch.float32 if lse_u.dtype != torch.float64 else lse_u.dtype)
        return _FUSED_BACKWARD(d_out_u, q_u, k_u, v_u, out_u, lse_u, 0.0, causal, attn_mask=None, scale=scale)
    d_lse_u = torch.zeros_like(lse_u) if d_lse_u is None else d_lse_u
    positions = query_key_positions(group.n_q, group.n_k, q_u.device)
    return blockwise_grads(q_u, k_u, v_u, out_u, lse_u, d_out_u, d_lse_u, Piece(*group.band), scale, positions)[:3]


class _DocumentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, native):
        lse_dtype = compute_dtype(q.dtype)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        lse = torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype, device=q.device)
        for group in plan.groups:
            q_u, k_u, v_u = _take(q, group, True), _take(k, group, False), _take(v, group, False)
            out_u, lse_u = _forward_group(q_u, k_u, v_u, group, scale, native)
            _put(out, group, out_u, True)
            _put(lse, group, lse_u.to(lse_dtype), True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.native = plan, scale, native
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        with_lse = d_lse is not None and bool(d_lse.any())
        delta = None
        if ctx.native:  # the row term of dS = P (dP - delta); rows without keys get no gradient
            delta = (d_out * out).sum(-1)
            if with_lse:
                delta = delta - torch.where(lse == float("-inf"), 0.0, d_lse)
        d_q, d_k, d_v = (torch.zeros_like(t) for t in (q, k, v))
        for group in ctx.plan.groups:
            q_u, k_u, v_u = _take(q, group, True), _take(k, group, False), _take(v, group, False)
            rows = [None if t is None else _take(t, group, True) for t in (out, lse, d_out, d_lse if with_lse else None, delta)]
            d_q_u, d_k_u, d_v_u = _backward_group(q_u, k_u, v_u, *rows, group, ctx.scale, ctx.native)
            _put(d_q, group, d_q_u, True)
            _put(d_k, group, d_k_u, False)
            _put(d_v, group, d_v_u, False)
        return d_q, d_k, d_v, None, None, None


def document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DocumentPlan, scale: float, *, native_bands: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of a document plan: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``, v
    ``(B, Hkv, Nk, Dv)`` (validated) -> ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``; rows with no
    allowed key give zeros and ``-inf``. Differentiable in q, k, v through out and lse.
    ``native_bands``: the caller has decided that the native band kernel runs these inputs."""
    return _DocumentAttention.apply(q, k, v, plan, scale, native_bands)


__all__ = ["document_attention"]
