"""Tile loads, score products and per-tile updates that the band and block-list Triton kernels share.

Imported only by :mod:`~attnkit.kernels.triton_band` and :mod:`~attnkit.kernels.triton_blocks`,
which are themselves imported lazily, so importing :mod:`attnkit` never imports Triton. Row and key
indices are widened to int64 before they meet a stride (``row * stride`` passes 2**31 at long
sequences with large strides); tile widths stay ``tl.constexpr``.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)  # natural-log LSE to base 2 and back


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32 at ``PRECISION`` ("ieee", "tf32", or "upcast" for the interpreter)."""
    if PRECISION == "upcast":  # the interpreter's bfloat16 dot is wrong; bf16 products are exact in float32
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def query_heads(bh, n_heads, group):
    """``(batch, head, kv_head)`` of program axis ``bh`` over ``batch * n_heads`` (``group`` query heads per KV head)."""
    head = bh % n_heads
    return bh // n_heads, head, head // group


@triton.jit
def head_base(PTR, batch, head, stride_b, stride_h):
    """Pointer to ``PTR[batch, head]`` (int64 offsets)."""
    return PTR + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def load_rows(base, idx, stride, valid, N: tl.constexpr, BW: tl.constexpr):
    """``(len(idx), BW)`` tile of rows ``idx`` (columns past ``N`` and invalid rows read 0)."""
    c = tl.arange(0, BW)
    return tl.load(base + idx.to(tl.int64)[:, None] * stride + c[None, :], mask=valid[:, None] & (c < N)[None, :],
                   other=0.0)


@triton.jit
def load_cols(base, idx, stride, valid, N: tl.constexpr, BW: tl.constexpr):
    """:func:`load_rows` transposed: ``(BW, len(idx))``."""
    c = tl.arange(0, BW)
    return tl.load(base + idx.to(tl.int64)[None, :] * stride + c[:, None], mask=valid[None, :] & (c < N)[:, None],
                   other=0.0)


@triton.jit
def dq_inputs(Q, DO, LSE, DELTA, batch, head, row, valid_q, sqb, sqh, sqn, sdb, sdh, sdn, n_heads, n_q,
              D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """What the dQ pass holds for one query tile: ``q, do``, the flat statistics offsets ``stat`` and
    :func:`row_stats` there."""
    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    do = load_rows(head_base(DO, batch, head, sdb, sdh), row, sdn, valid_q, DV, BDV)
    stat = (batch * n_heads + head).to(tl.int64) * n_q + row
    lse2, delta = row_stats(LSE, DELTA, stat, valid_q)
    return q, do, stat, lse2, delta


@triton.jit
def row_stats(LSE, DELTA, stat, valid):
    """The saved LSE in base 2 (``+inf`` for rows that saw no key, so their probabilities are 0) and
    ``delta`` of rows at flat offsets ``stat``."""
    lse2 = tl.load(LSE + stat, mask=valid, other=float("inf")) * _LOG2E
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
    delta = tl.load(DELTA + stat, mask=valid, other=0.0)
    return lse2, delta


@triton.jit
def softmax_step(acc, m_i, l_i, s, vt, PRECISION: tl.constexpr):
    """Online-softmax update of ``acc, m_i, l_i`` by base-2 scores ``s`` (masked: ``-inf``) and values ``vt``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    acc = acc * alpha[:, None] + dot(p.to(vt.dtype), vt, PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def store_forward(O, LSE, slot, acc, m_i, l_i, valid_q, DV: tl.constexpr, BDV: tl.constexpr):
    """Normalise and store the output rows and their natural-log LSE (``-inf`` and zeros where a row
    saw no key) at flat row offsets ``slot``."""
    dv = tl.arange(0, BDV)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / _LOG2E, float("-inf"))
    tl.store(O + slot[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty), mask=valid_q[:, None] & (dv < DV)[None, :])
    tl.store(LSE + slot, lse, mask=valid_q)


@triton.jit
def dq_step(dq, p, do, vt, kk, delta, PRECISION: tl.constexpr):
    """``dq += (p * (dO V^T - delta)) K`` for one key tile (``p`` already masked)."""
    ds = p * (dot(do, vt, PRECISION) - delta[:, None])
    return dq + dot(ds.to(kk.dtype), kk, PRECISION)


@triton.jit
def dkdv_step(dk, dvv, pt, qq, do, vv, delta, PRECISION: tl.constexpr):
    """``dV += P^T dO`` and ``dK += (P^T * (V dO^T - delta)) Q`` for one query tile (``pt`` already
    masked, laid out ``(keys, queries)``)."""
    dvv += dot(pt.to(do.dtype), do, PRECISION)
    dst = pt * (dot(vv, tl.trans(do), PRECISION) - delta[None, :])
    dk += dot(dst.to(qq.dtype), qq, PRECISION)
    return dk, dvv


@triton.jit
def store_rows(PTR, slot, x, valid, N: tl.constexpr, BW: tl.constexpr):
    """Store a ``(len(slot), BW)`` float32 tile into contiguous rows of width ``N`` at flat row offsets ``slot``."""
    c = tl.arange(0, BW)
    tl.store(PTR + slot[:, None] * N + c[None, :], x, mask=valid[:, None] & (c < N)[None, :])
