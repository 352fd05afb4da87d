"""Triton kernels for attention whose allowed keys form a band on a lattice: forward and backward.

One geometry covers sliding windows, Strided's two parts and Fixed's two parts. Each query row and
each key get a *logical* index:

- ``keys="lattice"``: with a lattice step ``S`` (1 for ordinary bands), residue ``r = pos % S``
  runs as its own sequence: query ``i = base + r + S*a`` has coordinate ``u = base // S + a`` and
  key ``j = r + S*b`` has index ``b`` (``base`` is the largest multiple of ``S`` at or below the
  first query position);
- ``keys="summary"``: the keys are Fixed's summary columns, the last ``width`` positions of every
  block of ``period``; key ``b`` sits at ``(b // width) * period + period - width + b % width``
  and query ``i`` has ``u`` = the number of summary keys it may see minus one (those of earlier
  blocks, plus those of its own block up to ``i`` when ``own``).

A pair is allowed when ``lo <= u - b <= hi`` and, with a ``segment``, when both positions lie in
the same block of ``segment`` (BlockLocal). Each query block walks exactly the key blocks its
band reaches; only blocks cut by an edge of the band evaluate the element mask (from the formula
above, nothing precomputed). Softmax runs online in float32 with exp2; the backward pass is
FlashAttention-2's: probabilities recomputed from the saved LSE, one pass for dK/dV (each program
owns one key block and loops over the query heads of its KV group: GQA without repeating K/V and
without atomics) and one for dQ.

Tensors: ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` with unit stride on the
last axis (other strides are free); outputs are allocated contiguous. Query row ``r`` sits at
position ``r + Nk - Nq``. Row and key indices are widened to int64 before they meet a stride:
``row * stride`` passes 2**31 at long sequences with large strides, and int32 would wrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_tiles import dkdv_step, dot, dq_inputs, dq_step, head_base, load_cols, load_rows, query_heads, row_stats
from .triton_tiles import softmax_step, store_forward, store_rows

_BIG_EDGE = 1 << 29  # stands for an infinite band edge in int32 arithmetic (sums of two stay in range)
_BIG = tl.constexpr(_BIG_EDGE)
_LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class BandPart:
    """One band geometry (see the module docstring). ``lo``/``hi`` may be +-inf."""

    lo: float
    hi: float
    step: int = 1
    keys: str = "lattice"
    period: int = 1
    width: int = 1
    own: bool = False
    segment: int = 0


@triton.jit
def _query_coords(a, base, offset, n_q, step, r, ubase, period, width, own, KEYS: tl.constexpr):
    """Positions, rows, validity and band coordinate ``u`` of the logical query indices ``a``."""
    i = base + r + step * a
    row = i - offset
    valid = (row >= 0) & (row < n_q)
    if KEYS == 0:
        u = ubase + a
    else:
        ic = tl.maximum(i, 0)
        in_block = ic % period - (period - width) + 1
        u = (ic // period) * width + own * tl.maximum(in_block, 0) - 1
        u = tl.where(i >= 0, u, -1)
    return i, row, valid, u


@triton.jit
def _key_positions(b, r, step, period, width, KEYS: tl.constexpr):
    if KEYS == 0:
        j = r + step * b
    else:
        j = (b // width) * period + (period - width) + b % width
    return j


@triton.jit
def _key_tile(b0, r, step, period, width, n_keys, BN: tl.constexpr, KEYS: tl.constexpr):
    """Logical indices ``b``, positions ``j`` and validity of the key tile starting at ``b0``."""
    b = b0 + tl.arange(0, BN)
    return b, _key_positions(b, r, step, period, width, KEYS), b < n_keys


@triton.jit
def _key_count(n_k, r, step, n_summary, KEYS: tl.constexpr):
    if KEYS == 0:
        count = (n_k - r + step - 1) // step
    else:
        count = n_summary
    return count


@triton.jit
def _band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED: tl.constexpr):
    d = u[:, None] - b[None, :]
    ok = (d >= lo) & (d <= hi) & (b < n_keys)[None, :]
    if SEGMENTED:
        ok = ok & ((tl.maximum(i, 0) // segment)[:, None] == (j // segment)[None, :])
    return ok


@triton.jit
def _band_mask_t(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED: tl.constexpr):
    """:func:`_band_mask` laid out ``(keys, queries)`` for the dK/dV pass."""
    d = u[None, :] - b[:, None]
    ok = (d >= lo) & (d <= hi) & (b < n_keys)[:, None]
    if SEGMENTED:
        ok = ok & ((tl.maximum(i, 0) // segment)[None, :] == (j // segment)[:, None])
    return ok


@triton.jit
def _query_span(u, i, valid_q):
    """Smallest and largest band coordinate, and smallest position, of the valid queries of a tile."""
    u_min = tl.min(tl.where(valid_q, u, _BIG), 0)
    u_max = tl.max(tl.where(valid_q, u, -_BIG), 0)
    i_min = tl.min(tl.where(valid_q, i, _BIG), 0)
    return u_min, u_max, i_min


@triton.jit
def _key_range(u_min, u_max, i_min, n_keys, lo, hi, segment, SEGMENTED: tl.constexpr, BN: tl.constexpr):
    """Key blocks ``b_start + t*BN`` (``t < n_tiles``) a query block reaches; tiles in
    ``[t_full, t_stop)`` need no element mask."""
    b_start = tl.maximum(u_min - hi, 0)
    if SEGMENTED:
        b_start = tl.maximum(b_start, (tl.maximum(i_min, 0) // segment) * segment)
    b_end = tl.minimum(u_max - lo + 1, n_keys)
    n_tiles = tl.maximum(b_end - b_start + BN - 1, 0) // BN
    t_full = tl.maximum(u_max - hi - b_start + BN - 1, 0) // BN
    x = tl.minimum(u_min - lo, n_keys - 1) - BN + 1 - b_start
    t_stop = tl.where(x >= 0, x // BN + 1, 0)
    if SEGMENTED:
        t_stop = t_full
    return b_start, n_tiles, t_full, t_stop


@triton.jit
def _query_block(pid_m, r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi, segment,
                 BM: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr):
    """Query block ``pid_m`` of residue ``r``: its :func:`_query_coords`, the key count, and the key
    tiles it walks (:func:`_key_range`)."""
    a = pid_m * BM + tl.arange(0, BM)
    i, row, valid_q, u = _query_coords(a, base, offset, n_q, step, r, ubase, period, width, own, KEYS)
    n_keys = _key_count(n_k, r, step, n_summary, KEYS)
    u_min, u_max, i_min = _query_span(u, i, valid_q)
    b_start, n_tiles, t_full, t_stop = _key_range(u_min, u_max, i_min, n_keys, lo, hi, segment, SEGMENTED, BN)
    return i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b0, u, i, n_keys, lo, hi, segment, r, step, period, width,
              skn, svn, scale2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr, MASKED: tl.constexpr,
              PRECISION: tl.constexpr):
    """One key tile of the forward pass: online-softmax update of ``acc, m_i, l_i``."""
    b, j, valid_k = _key_tile(b0, r, step, period, width, n_keys, BN, KEYS)
    s = dot(q, load_cols(k_base, j, skn, valid_k, D, BD), PRECISION) * scale2
    if MASKED:
        s = tl.where(_band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED), s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, load_rows(v_base, j, svn, valid_k, DV, BDV), PRECISION)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, b0, u, i, n_keys, lo, hi, segment, r, step, period, width,
             skn, svn, scale2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
             BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr, MASKED: tl.constexpr,
             PRECISION: tl.constexpr):
    """One key tile of the dQ pass."""
    b, j, valid_k = _key_tile(b0, r, step, period, width, n_keys, BN, KEYS)
    kk = load_rows(k_base, j, skn, valid_k, D, BD)
    vt = load_cols(v_base, j, svn, valid_k, DV, BDV)
    p = tl.math.exp2(dot(q, tl.trans(kk), PRECISION) * scale2 - lse2[:, None])
    if MASKED:
        p = tl.where(_band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED), p, 0.0)
    return dq_step(dq, p, do, vt, kk, delta, PRECISION)


@triton.jit
def _band_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    n_batch, n_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, scale2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    batch, head, kv_head = query_heads(bh, n_heads, group)

    i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop = _query_block(
        pid_m, r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi, segment,
        BM, BN, KEYS, SEGMENTED)
    per_split = (n_tiles + SPLITS - 1) // SPLITS
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    # Three loops (masked edge, unmasked interior, masked edge) keep the interior loop free of
    # branches, so the compiler can pipeline its loads.
    for t in range(t0, tl.minimum(t_full, t1)):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED,
                                  True, PRECISION)
    for t in range(tl.maximum(t_full, t0), tl.minimum(t_stop, t1)):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED,
                                  False, PRECISION)
    for t in range(tl.maximum(tl.maximum(t_full, t_stop), t0), t1):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED,
                                  True, PRECISION)

    slot = ((split * n_batch + batch) * n_heads + head).to(tl.int64) * n_q + row
    store_forward(O, LSE, slot, acc, m_i, l_i, valid_q, DV, BDV)


@triton.jit
def _band_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.program_id(2)
    batch, head, kv_head = query_heads(bh, n_heads, group)

    i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop = _query_block(
        pid_m, r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi, segment,
        BM, BN, KEYS, SEGMENTED)

    q, do, stat, lse2, delta = dq_inputs(Q, DO, LSE, DELTA, batch, head, row, valid_q, sqb, sqh, sqn, sdb, sdh, sdn,
                                         n_heads, n_q, D, DV, BD, BDV)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)

    dq = tl.zeros([BM, BD], tl.float32)
    for t in range(0, tl.minimum(t_full, n_tiles)):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment, r, step,
                      period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED, True, PRECISION)
    for t in range(t_full, tl.minimum(t_stop, n_tiles)):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment, r, step,
                      period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED, False, PRECISION)
    for t in range(tl.maximum(t_full, t_stop), n_tiles):
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment, r, step,
                      period, width, skn, svn, scale2, D, DV, BD, BDV, BN, KEYS, SEGMENTED, True, PRECISION)
    store_rows(DQ, stat, dq * scale, valid_q, D, BD)


@triton.jit
def _band_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, n_kv_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, n_lattice, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.program_id(2)
    batch = bh // n_kv_heads
    kv_head = bh % n_kv_heads

    n_keys = _key_count(n_k, r, step, n_summary, KEYS)
    b0 = pid_n * BN
    b = b0 + tl.arange(0, BN)
    valid_k = b < n_keys
    j = _key_positions(b, r, step, period, width, KEYS)
    b_last = tl.minimum(b0 + BN, n_keys) - 1
    # Logical query indices whose band reaches these keys (u is increasing in a).
    if KEYS == 0:
        a_start = tl.maximum(b0 + lo - ubase, 0)
        a_end = tl.minimum(b_last + hi - ubase + 1, n_lattice)
    else:
        first = b0 + lo  # smallest u that reaches key b0 (lo >= 0 for summary keys)
        if own:
            i_first = (first // width) * period + (period - width) + first % width
        else:
            i_first = ((first + width) // width) * period
        a_start = tl.maximum(i_first - base, 0)
        a_end = n_lattice  # summary parts have no upper band edge
    if SEGMENTED:
        j_last = r + step * b_last
        a_end = tl.minimum(a_end, ((j_last // segment + 1) * segment - base - r + step - 1) // step)

    kk = load_rows(head_base(K, batch, kv_head, skb, skh), j, skn, valid_k, D, BD)
    vv = load_rows(head_base(V, batch, kv_head, svb, svh), j, svn, valid_k, DV, BDV)
    dk = tl.zeros([BN, BD], tl.float32)
    dvv = tl.zeros([BN, BDV], tl.float32)
    full_keys = b0 + BN <= n_keys
    for g in range(0, group):
        head = kv_head * group + g
        q_base = head_base(Q, batch, head, sqb, sqh)
        do_base = head_base(DO, batch, head, sdb, sdh)
        stat_base = (batch * n_heads + head).to(tl.int64) * n_q
        for a0 in range(a_start, a_end, BM):
            a = a0 + tl.arange(0, BM)
            i, row, valid_q, u = _query_coords(a, base, offset, n_q, step, r, ubase, period, width, own, KEYS)
            qq = load_rows(q_base, row, sqn, valid_q, D, BD)
            do = load_rows(do_base, row, sdn, valid_q, DV, BDV)
            lse2, delta = row_stats(LSE, DELTA, stat_base + row, valid_q)
            pt = tl.math.exp2(dot(kk, tl.trans(qq), PRECISION) * scale2 - lse2[None, :])
            u_min, u_max, _ = _query_span(u, i, valid_q)
            full = full_keys & (u_min - (b0 + BN - 1) >= lo) & (u_max - b0 <= hi)
            if SEGMENTED:
                pt = tl.where(_band_mask_t(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED), pt, 0.0)
            elif not full:
                pt = tl.where(_band_mask_t(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED), pt, 0.0)
            dk, dvv = dkdv_step(dk, dvv, pt, qq, do, vv, delta, PRECISION)
    slot = (batch * n_kv_heads + kv_head).to(tl.int64) * n_k + j
    store_rows(DK, slot, dk * scale, valid_k, D, BD)
    store_rows(DV_OUT, slot, dvv, valid_k, DV, BDV)


def _edge(x: float) -> int:
    return max(-_BIG_EDGE, min(_BIG_EDGE, int(x))) if math.isfinite(x) else (_BIG_EDGE if x > 0 else -_BIG_EDGE)


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class _Geometry:
    """Launch arguments of one part for one ``n_q x n_k`` problem."""

    lo: int
    hi: int
    step: int
    base: int
    ubase: int
    n_lattice: int
    n_summary: int
    residues: int
    key_slots: int  # logical keys per residue (the dK/dV grid)

    def args(self, part: BandPart) -> tuple:
        return (self.lo, self.hi, self.step, self.base, self.ubase, part.period, part.width,
                int(part.own), self.n_summary, max(part.segment, 1))


def _geometry(part: BandPart, n_q: int, n_k: int) -> _Geometry:
    offset = n_k - n_q
    lo, hi = _edge(part.lo), _edge(part.hi)
    if part.keys == "summary":
        n_summary = (n_k // part.period) * part.width + max(0, n_k % part.period - (part.period - part.width))
        return _Geometry(lo, hi, 1, offset, 0, n_q, n_summary, 1, n_summary)
    step = part.step
    base = (offset // step) * step
    n_lattice = -(-(offset + n_q - base) // step)
    return _Geometry(lo, hi, step, base, base // step, n_lattice, 0, step, -(-n_k // step))


def block_sizes(head_dim: int, value_dim: int, backward: bool, element_size: int = 2) -> tuple[int, int, int, int]:
    """``(BM, BN, num_warps, num_stages)``: small tiles in the interpreter (more edge cases per
    test and less numpy work), FlashAttention-like tiles on a GPU, halved when a row holds more
    than 256 bytes (head dims over 128 in half precision, over 64 in float32) so the tiles fit
    in shared memory."""
    if interpreting():
        return 16, 16, 1, 1
    wide = max(head_dim, value_dim) * element_size > 256
    if backward:
        return (32, 32, 4, 1) if wide else (64, 64, 4, 2)
    return (64, 32, 4, 2) if wide else (128, 64, 8, 3)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _precision(q: torch.Tensor) -> str:
    if q.dtype == torch.bfloat16 and interpreting():
        return "upcast"
    # float32 inputs take IEEE float32 FMA (no tensor cores: exact, slower); TF32 would round the
    # inputs to 10 mantissa bits. float16/bfloat16 products are exact on tensor cores.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def band_forward(part: BandPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 out_dtype: torch.dtype, splits: int = 1, block_m: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one part forward. Returns ``out (splits, B, Hq, Nq, Dv)`` in ``out_dtype`` and
    ``lse (splits, B, Hq, Nq)`` float32 (natural log; ``-inf`` where a row saw no key). With
    ``splits > 1`` every program takes one share of a query block's key blocks (flash-decoding);
    the caller merges the shares by their LSE. ``block_m`` overrides the query tile."""
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    geo = _geometry(part, n_q, n_k)
    bm, bn, warps, stages = block_sizes(head_dim, value_dim, False, q.element_size())
    bm = block_m or bm
    out = torch.empty(splits, batch, n_heads, n_q, value_dim, device=q.device, dtype=out_dtype)
    lse = torch.empty(splits, batch, n_heads, n_q, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(geo.n_lattice, bm), batch * n_heads, geo.residues * splits)
    _band_fwd[grid](
        q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        batch, n_heads, n_heads // n_kv, n_q, n_k, n_k - n_q, *geo.args(part), scale * _LOG2E,
        D=head_dim, DV=value_dim, BD=_pow2(head_dim), BDV=_pow2(value_dim), BM=bm, BN=bn,
        KEYS=int(part.keys == "summary"), SEGMENTED=part.segment > 0, SPLITS=splits,
        PRECISION=_precision(q), num_warps=warps, num_stages=stages,
    )
    return out, lse


def band_backward(part: BandPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                  lse: torch.Tensor, delta: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Gradients of one part given the *final* ``lse`` and ``delta = rowsum(dO * O) - dLSE``
    (both ``(B, Hq, Nq)`` float32 contiguous): ``(dq, dk, dv)`` in float32, contiguous."""
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    geo = _geometry(part, n_q, n_k)
    bm, bn, warps, stages = block_sizes(head_dim, value_dim, True, q.element_size())
    dq = torch.empty(batch, n_heads, n_q, head_dim, device=q.device, dtype=torch.float32)
    dk = torch.zeros(batch, n_kv, n_k, head_dim, device=q.device, dtype=torch.float32)
    dv = torch.zeros(batch, n_kv, n_k, value_dim, device=q.device, dtype=torch.float32)
    common = dict(D=head_dim, DV=value_dim, BD=_pow2(head_dim), BDV=_pow2(value_dim), BM=bm, BN=bn,
                  KEYS=int(part.keys == "summary"), SEGMENTED=part.segment > 0, PRECISION=_precision(q),
                  num_warps=warps, num_stages=stages)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    _band_bwd_dq[(triton.cdiv(geo.n_lattice, bm), batch * n_heads, geo.residues)](
        q, k, v, grad_out, lse, delta, dq, *strides,
        n_heads, n_heads // n_kv, n_q, n_k, n_k - n_q, *geo.args(part), scale * _LOG2E, scale, **common,
    )
    _band_bwd_dkdv[(triton.cdiv(geo.key_slots, bn), batch * n_kv, geo.residues)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides,
        n_heads, n_kv, n_heads // n_kv, n_q, n_k, n_k - n_q, *geo.args(part), geo.n_lattice,
        scale * _LOG2E, scale, **common,
    )
    return dq, dk, dv


def key_tiles(part: BandPart, n_q: int, n_k: int) -> int:
    """Key tiles the widest query block of a decode-sized call (``n_q`` small) walks."""
    geo = _geometry(part, n_q, n_k)
    _, bn, _, _ = block_sizes(16, 16, backward=False)
    span = min(geo.hi - geo.lo + 1 + n_q, geo.key_slots)
    return triton.cdiv(max(span, 1), bn)
