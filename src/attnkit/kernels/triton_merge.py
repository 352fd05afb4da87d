"""Two small Triton kernels around the attention kernels: the backward pass's ``delta`` and the merge
of a decode call's key shares.

- :func:`backward_delta`: ``delta = rowsum(dO * O) - dLSE`` in float32, read in the inputs' dtype
  (the preprocess of FlashAttention-2's backward; ``dLSE`` folds in because ``d lse / d s = p``);
- :func:`merge_partials`: the float32 partial results of a decode call (each split of each part:
  normalised rows and their LSE) merged by LSE into the output dtype, in one kernel.

Rows are flat ``(B, H, Nq)`` indices; outputs are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_configs as configs
from .triton_tiles import LOG2E

_ROWS = 64  # rows per program (16 in the interpreter)
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def _delta(O, DO, DLSE, DELTA, sdb, sdh, sdn, n_heads, n_q, n_rows,
           DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr, HAS_DLSE: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    valid = rows < n_rows
    c = tl.arange(0, BDV)
    io_mask = valid[:, None] & (c < DV)[None, :]
    n = rows % n_q
    bh = rows // n_q
    do_rows = (bh // n_heads).to(tl.int64) * sdb + (bh % n_heads).to(tl.int64) * sdh + n.to(tl.int64) * sdn
    o = tl.load(O + rows.to(tl.int64)[:, None] * DV + c[None, :], mask=io_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + do_rows[:, None] + c[None, :], mask=io_mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=valid, other=0.0)
    tl.store(DELTA + rows, delta, mask=valid)


@triton.jit
def _merge_partials(P_OUT, P_LSE, O, LSE, n_slots, n_rows,
                    DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    valid = rows < n_rows
    c = tl.arange(0, BDV)
    io_mask = valid[:, None] & (c < DV)[None, :]
    m = tl.full([BR], float("-inf"), tl.float32)
    total = tl.zeros([BR], tl.float32)
    acc = tl.zeros([BR, BDV], tl.float32)
    for s in range(0, n_slots):
        at = s * n_rows + rows  # n_slots * n_rows: decode-sized, far from 2**31
        lse2 = tl.load(P_LSE + at, mask=valid, other=float("-inf")) * _LOG2E
        out = tl.load(P_OUT + at[:, None] * DV + c[None, :], mask=io_mask, other=0.0)
        m_new = tl.maximum(m, lse2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        weight = tl.math.exp2(lse2 - m_safe)
        acc = acc * alpha[:, None] + out * weight[:, None]
        total = total * alpha + weight
        m = m_new
    seen = total > 0.0
    norm = tl.where(seen, total, 1.0)
    tl.store(O + rows.to(tl.int64)[:, None] * DV + c[None, :], (acc / norm[:, None]).to(O.dtype.element_ty),
             mask=io_mask)
    tl.store(LSE + rows, tl.where(seen, m + tl.math.log2(norm), float("-inf")) / _LOG2E, mask=valid)


def _rows_per_program() -> int:
    return configs.INTERPRETER[0] if configs.interpreting() else _ROWS


def backward_delta(out: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> torch.Tensor:
    """``(B, H, Nq)`` float32 ``rowsum(grad_out * out) - grad_lse``; ``out`` contiguous, ``grad_out``
    with unit stride on the last axis, ``grad_lse (B, H, Nq)`` float32 or None."""
    batch, n_heads, n_q, value_dim = out.shape
    delta = torch.empty(batch, n_heads, n_q, device=out.device, dtype=torch.float32)
    n_rows = batch * n_heads * n_q
    rows = _rows_per_program()
    dlse = grad_lse.contiguous() if grad_lse is not None else delta
    _delta[(triton.cdiv(n_rows, rows),)](
        out, grad_out, dlse, delta, *grad_out.stride()[:3], n_heads, n_q, n_rows,
        DV=value_dim, BDV=configs.pow2(value_dim), BR=rows, HAS_DLSE=grad_lse is not None,
    )
    return delta


def merge_partials(partial_out: torch.Tensor, partial_lse: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``partial_out (S, B, H, Nq, Dv)`` float32 and ``partial_lse (S, B, H, Nq)`` by LSE:
    ``(out (B, H, Nq, Dv)`` in ``dtype``, ``lse (B, H, Nq)`` float32); a row no share saw a key
    for gets zeros and ``-inf``."""
    n_slots, batch, n_heads, n_q, value_dim = partial_out.shape
    out = torch.empty(batch, n_heads, n_q, value_dim, device=partial_out.device, dtype=dtype)
    lse = torch.empty(batch, n_heads, n_q, device=partial_out.device, dtype=torch.float32)
    n_rows = batch * n_heads * n_q
    rows = _rows_per_program()
    _merge_partials[(triton.cdiv(n_rows, rows),)](
        partial_out, partial_lse, out, lse, n_slots, n_rows, DV=value_dim, BDV=configs.pow2(value_dim), BR=rows,
    )
    return out, lse
