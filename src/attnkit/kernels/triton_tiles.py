"""Tile loads, score products, per-tile updates and stores that the Triton kernels share.

Imported only by the kernel modules (:mod:`~attnkit.kernels.triton_band`,
:mod:`~attnkit.kernels.triton_blocks`, :mod:`~attnkit.kernels.triton_merge`), which are themselves
imported lazily, so importing :mod:`attnkit` never imports Triton. Row and key indices are widened
to int64 before they meet a stride (``row * stride`` passes 2**31 at long sequences with large
strides); tile widths stay ``tl.constexpr``.

Score modifications (:mod:`~attnkit.kernels.triton_mods`) apply to the base-2 scores right after
:func:`scores`, before the element mask; their derivative applies to ``dS`` (:func:`score_grad`)
before :func:`dq_step` and inside :func:`dkdv_step`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E
from .triton_mods import raw_grad

# The kernels' scores and statistics are base 2 (``exp2``), their LSEs natural.
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32 at ``PRECISION`` ("ieee", "tf32", "tf32x3", or "upcast" for
    the interpreter's bfloat16)."""
    if PRECISION == "upcast":  # the interpreter's bfloat16 dot is wrong; bf16 products are exact in float32
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def scores(q, kt, scale2, PRECISION: tl.constexpr):
    """Base-2 scores ``(q @ kt) * scale * log2(e)`` of a ``(rows, D)`` and a ``(D, keys)`` tile."""
    return dot(q, kt, PRECISION) * scale2


@triton.jit
def program_coords(n0, n1, FOLDED: tl.constexpr):
    """The program's coordinates on a logical ``(n0, n1, n2)`` grid: the launch grid itself, or
    (``FOLDED``) a one-axis grid of ``n0 * n1 * n2`` programs, axis 0 fastest as on a 3-D grid."""
    if FOLDED:
        flat = tl.program_id(0)
        c0 = flat % n0
        c1 = (flat // n0) % n1
        c2 = flat // n0 // n1
    else:
        c0 = tl.program_id(0)
        c1 = tl.program_id(1)
        c2 = tl.program_id(2)
    return c0, c1, c2


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
def store_forward(O, LSE, O_PREV, LSE_PREV, slot, acc, m_i, l_i, valid_q, DV: tl.constexpr, BDV: tl.constexpr,
                  MERGE: tl.constexpr):
    """Normalise and store the output rows and their natural-log LSE (``-inf`` and zeros where a row
    saw no key) at flat row offsets ``slot``. With ``MERGE``, first merge them by LSE with the
    result of the parts before (``O_PREV`` float32, ``LSE_PREV`` at the same offsets): the
    epilogue that saves a multi-part plan a separate merge pass. ``O`` takes the output dtype."""
    dv = tl.arange(0, BDV)
    io_mask = valid_q[:, None] & (dv < DV)[None, :]
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    if MERGE:
        prev = tl.load(O_PREV + slot[:, None] * DV + dv[None, :], mask=io_mask, other=0.0)
        prev2 = tl.load(LSE_PREV + slot, mask=valid_q, other=float("-inf")) * _LOG2E
        out, lse2 = merge_step(prev, prev2, out, lse2)
    tl.store(O + slot[:, None] * DV + dv[None, :], out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + slot, lse2 / _LOG2E, mask=valid_q)


@triton.jit
def merge_step(out_a, lse2_a, out_b, lse2_b):
    """Two normalised results over disjoint key sets merged by their base-2 LSEs (``-inf``: no key)."""
    top = tl.maximum(lse2_a, lse2_b)
    top = tl.where(top == float("-inf"), 0.0, top)
    w_a = tl.math.exp2(lse2_a - top)
    w_b = tl.math.exp2(lse2_b - top)
    total = w_a + w_b
    seen = total > 0.0
    norm = tl.where(seen, total, 1.0)
    out = out_a * (w_a / norm)[:, None] + out_b * (w_b / norm)[:, None]
    return out, tl.where(seen, top + tl.math.log2(norm), float("-inf"))


@triton.jit
def score_grad(p, do, vt, delta, PRECISION: tl.constexpr):
    """``dS = p * (dO V^T - delta)`` of one key tile (``p`` already masked): the gradient of the
    (modified) scores, natural units."""
    return p * (dot(do, vt, PRECISION) - delta[:, None])


@triton.jit
def dq_step(dq, ds, kk, PRECISION: tl.constexpr):
    """``dq += dS K`` for one key tile (``ds``: the gradient of the raw scores)."""
    return dq + dot(ds.to(kk.dtype), kk, PRECISION)


@triton.jit
def dkdv_step(dk, dvv, pt, st, qq, do, vv, delta, cap2, PRECISION: tl.constexpr, MOD: tl.constexpr):
    """``dV += P^T dO`` and ``dK += (P^T * (V dO^T - delta)) Q`` for one query tile (``pt`` already
    masked, laid out ``(keys, queries)``; ``st`` its modified base-2 scores, for the soft-cap's
    derivative, :func:`~attnkit.kernels.triton_mods.raw_grad`)."""
    dvv += dot(pt.to(do.dtype), do, PRECISION)
    dst = raw_grad(pt * (dot(vv, tl.trans(do), PRECISION) - delta[None, :]), st, cap2, MOD)
    dk += dot(dst.to(qq.dtype), qq, PRECISION)
    return dk, dvv


@triton.jit
def store_rows(PTR, slot, x, valid, N: tl.constexpr, BW: tl.constexpr):
    """Store a ``(len(slot), BW)`` tile into contiguous rows of width ``N`` at flat row offsets
    ``slot``, in ``PTR``'s dtype."""
    c = tl.arange(0, BW)
    tl.store(PTR + slot[:, None] * N + c[None, :], x.to(PTR.dtype.element_ty), mask=valid[:, None] & (c < N)[None, :])


@triton.jit
def store_grad_rows(OUT, ACC_IN, ACC_OUT, slot, x, valid, later, N: tl.constexpr, BW: tl.constexpr,
                    READ_ACC: tl.constexpr, WRITE_ACC: tl.constexpr):
    """Store one part's gradient rows of a multi-part plan (one part: ``OUT`` only).

    ``READ_ACC``: add what the parts before left in ``ACC_IN`` (float32; the first part of a plan
    covers every row, so every row holds a value). ``WRITE_ACC``: rows where ``later`` (a part
    after this one adds to them) go to ``ACC_OUT`` (float32), the others to ``OUT`` in the
    gradient's dtype: every row is written once in its final dtype, by the last part to touch it.
    """
    c = tl.arange(0, BW)
    cols = (c < N)[None, :]
    offsets = slot[:, None] * N + c[None, :]
    if READ_ACC:
        x += tl.load(ACC_IN + offsets, mask=valid[:, None] & cols, other=0.0)
    if WRITE_ACC:
        tl.store(ACC_OUT + offsets, x, mask=(valid & later)[:, None] & cols)
        tl.store(OUT + offsets, x.to(OUT.dtype.element_ty), mask=(valid & ~later)[:, None] & cols)
    else:
        tl.store(OUT + offsets, x.to(OUT.dtype.element_ty), mask=valid[:, None] & cols)
