"""Triton kernels for attention whose allowed keys form a band on a lattice: forward and backward.

One geometry, a :class:`~attnkit.patterns.Piece` (the pattern declares its pieces once; the CPU
planner reads the same ones), covers sliding windows, Strided's two parts and Fixed's two parts.
Each query row and each key get a *logical* index:

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
band reaches, and each key block (dK/dV) exactly the query blocks that reach it; the tiles cut
by an edge of the band run in separate loops from the interior ones (a ``constexpr`` choice per
loop), so only they evaluate the element mask (from the formula above, nothing precomputed)
and the interior loops stay free of branches for the compiler to pipeline. Softmax runs online
in float32 with exp2; the backward pass is FlashAttention-2's: probabilities recomputed from the
saved LSE, one pass for dK/dV (each program owns one key block and loops over the query heads of
its KV group: GQA without repeating K/V and without atomics) and one for dQ, both storing the
gradients in the input dtype (or, between the parts of a plan, in float32 scratch). A score
modification (``MOD``, :mod:`~attnkit.kernels.triton_mods`) applies to each tile's scores at the
rows' and keys' absolute positions before the element mask, in all three kernels; the dQ pass
also sums its parameter's gradient.

Decode-sized calls (``PACKED``) put a GQA group's heads and its few queries into one 16-row
query tile with a wide key tile, and split the keys across programs (``SPLITS``); the shares go to
float32 partials that :mod:`~attnkit.kernels.triton_merge` combines in one kernel.

Tensors: ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)`` with unit stride on the
last axis (other strides are free); outputs are allocated contiguous. Query row ``r`` sits at
position ``r + Nk - Nq``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..patterns import SUMMARY, Piece
from .score_mods import ScoreMod
from . import triton_configs as configs
from .triton_mods import mod_arguments, mod_code, modify, parameter_step, partial_buffer, reduce_partials
from .triton_mods import raw_grad, store_parameter
from .triton_tiles import LOG2E, dkdv_step, dq_step, head_base, load_cols, load_rows, program_coords, query_heads
from .triton_tiles import row_stats, score_grad, scores, softmax_step, store_forward, store_grad_rows

_BIG_EDGE = 1 << 29  # stands for an infinite band edge in int32 arithmetic (sums of two stay in range)
_BIG = tl.constexpr(_BIG_EDGE)


def touched_keys(part: Piece) -> tuple[int, int]:
    """``(period, width)``: the keys a part reaches are those with ``j % period >= period - width``
    (``(1, 1)``: every key)."""
    return (part.period, part.width) if part.keys == SUMMARY else (1, 1)


# ---------------------------------------------------------------------------------------------
# Geometry in the kernels


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
def _key_count(n_k, r, step, n_summary, KEYS: tl.constexpr):
    if KEYS == 0:
        count = (n_k - r + step - 1) // step
    else:
        count = n_summary
    return count


@triton.jit
def _band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Which pairs of a tile are allowed: ``(queries, keys)``, or ``(keys, queries)`` when ``TRANSPOSED``."""
    if TRANSPOSED:
        d = u[None, :] - b[:, None]
        ok = (d >= lo) & (d <= hi) & (b < n_keys)[:, None]
        if SEGMENTED:
            ok = ok & ((tl.maximum(i, 0) // segment)[None, :] == (j // segment)[:, None])
    else:
        d = u[:, None] - b[None, :]
        ok = (d >= lo) & (d <= hi) & (b < n_keys)[None, :]
        if SEGMENTED:
            ok = ok & ((tl.maximum(i, 0) // segment)[:, None] == (j // segment)[None, :])
    return ok


@triton.jit
def _query_span(u, i, valid_q):
    """Smallest and largest band coordinate, and smallest and largest position, of the valid queries of a tile."""
    u_min = tl.min(tl.where(valid_q, u, _BIG), 0)
    u_max = tl.max(tl.where(valid_q, u, -_BIG), 0)
    i_min = tl.min(tl.where(valid_q, i, _BIG), 0)
    i_max = tl.max(tl.where(valid_q, i, -_BIG), 0)
    return u_min, u_max, i_min, i_max


@triton.jit
def _tile_split(n_items, start, full_from, full_to, B: tl.constexpr):
    """Tiles ``start + t*B`` (``t < n_tiles``) over ``n_items`` indices; tiles in ``[t_full,
    t_stop)`` lie in ``[full_from, full_to]`` (no element mask)."""
    n_tiles = (tl.maximum(n_items, 0) + B - 1) // B
    t_full = (tl.maximum(full_from - start, 0) + B - 1) // B
    x = full_to - B + 1 - start
    t_stop = tl.where(x >= 0, x // B + 1, 0)
    return n_tiles, t_full, t_stop


@triton.jit
def _key_range(u_min, u_max, i_min, i_max, n_keys, lo, hi, segment, SEGMENTED: tl.constexpr, BN: tl.constexpr):
    """Key blocks ``b_start + t*BN`` (``t < n_tiles``) a query block reaches; tiles in
    ``[t_full, t_stop)`` need no element mask."""
    b_start = tl.maximum(u_min - hi, 0)
    if SEGMENTED:
        b_start = tl.maximum(b_start, (tl.maximum(i_min, 0) // segment) * segment)
    b_end = tl.minimum(u_max - lo + 1, n_keys)
    full_to = tl.minimum(u_min - lo, n_keys - 1)
    if SEGMENTED:  # a query block across two segments masks every tile
        full_to = tl.where(tl.maximum(i_min, 0) // segment == i_max // segment, full_to, -_BIG)
    n_tiles, t_full, t_stop = _tile_split(b_end - b_start, b_start, u_max - hi, full_to, BN)
    return b_start, n_tiles, t_full, t_stop


@triton.jit
def _query_block(a, r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi, segment,
                 BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr):
    """A tile of logical query indices ``a`` of residue ``r``: its :func:`_query_coords`, the key
    count, and the key tiles it walks (:func:`_key_range`)."""
    i, row, valid_q, u = _query_coords(a, base, offset, n_q, step, r, ubase, period, width, own, KEYS)
    n_keys = _key_count(n_k, r, step, n_summary, KEYS)
    u_min, u_max, i_min, i_max = _query_span(u, i, valid_q)
    b_start, n_tiles, t_full, t_stop = _key_range(u_min, u_max, i_min, i_max, n_keys, lo, hi, segment, SEGMENTED, BN)
    return i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop


@triton.jit
def _first_summary_query(x, period, width, own):
    """The first position whose summary coordinate ``u`` reaches ``x`` (``u`` grows with position)."""
    if own:
        i = (x // width) * period + (period - width) + x % width
    else:
        i = ((x + width) // width) * period
    return i


@triton.jit
def _query_range(b0, b_last, r, lo, hi, base, ubase, n_lattice, step, period, width, own, segment,
                 KEYS: tl.constexpr, SEGMENTED: tl.constexpr, BM: tl.constexpr):
    """Query tiles ``a_start + t*BM`` (``t < n_tiles``) that reach keys ``b0..b_last``; tiles in
    ``[t_full, t_stop)`` see every one of them (no element mask). Summary keys have no upper edge."""
    if KEYS == 0:
        a_start = tl.maximum(b0 + lo - ubase, 0)
        a_end = tl.minimum(b_last + hi - ubase + 1, n_lattice)
        full_from = b_last + lo - ubase
        full_to = b0 + hi - ubase
    else:
        a_start = tl.maximum(_first_summary_query(b0 + lo, period, width, own) - base, 0)
        a_end = n_lattice
        full_from = _first_summary_query(b_last + lo, period, width, own) - base
        full_to = _BIG
    if SEGMENTED:  # a lattice of step 1: a = position - base
        j0 = r + step * b0
        j_last = r + step * b_last
        segment_end = (j_last // segment + 1) * segment
        a_end = tl.minimum(a_end, segment_end - base)
        full_from = tl.maximum(full_from, (j0 // segment) * segment - base)
        full_to = tl.where(j0 // segment == j_last // segment, tl.minimum(full_to, segment_end - 1 - base), -_BIG)
    n_tiles, t_full, t_stop = _tile_split(a_end - a_start, a_start, full_from, full_to, BM)
    return a_start, n_tiles, t_full, t_stop


# ---------------------------------------------------------------------------------------------
# One tile


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b0, u, i, n_keys, lo, hi, segment, r, step, period, width,
              skn, svn, scale2, BIAS, head, n_bias, cap2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
              BDV: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr,
              MASKED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr):
    """One key tile of the forward pass: online-softmax update of ``acc, m_i, l_i``."""
    b = b0 + tl.arange(0, BN)
    j = _key_positions(b, r, step, period, width, KEYS)
    valid_k = b < n_keys
    s = scores(q, load_cols(k_base, j, skn, valid_k, D, BD), scale2, PRECISION)
    if MOD != 0:
        s = modify(s, j[None, :] - i[:, None], BIAS, head, n_bias, cap2, MOD)
    if MASKED:
        s = tl.where(_band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED, False), s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, load_rows(v_base, j, svn, valid_k, DV, BDV), PRECISION)


@triton.jit
def _dq_tile(dq, dparam, q, do, lse2, delta, k_base, v_base, b0, u, i, n_keys, lo, hi, segment, r, step, period,
             width, skn, svn, scale2, BIAS, head, n_bias, cap2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
             BDV: tl.constexpr, BN: tl.constexpr, KEYS: tl.constexpr, SEGMENTED: tl.constexpr,
             MASKED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr, BR: tl.constexpr):
    """One key tile of the dQ pass (and of the score mod's parameter gradient ``dparam``)."""
    b = b0 + tl.arange(0, BN)
    j = _key_positions(b, r, step, period, width, KEYS)
    valid_k = b < n_keys
    kk = load_rows(k_base, j, skn, valid_k, D, BD)
    vt = load_cols(v_base, j, svn, valid_k, DV, BDV)
    s = scores(q, tl.trans(kk), scale2, PRECISION)
    if MOD != 0:
        offset = j[None, :] - i[:, None]
        s = modify(s, offset, BIAS, head, n_bias, cap2, MOD)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED, False), p, 0.0)
    ds = score_grad(p, do, vt, delta, PRECISION)
    if MOD >= 2:
        dparam = parameter_step(dparam, ds, offset, n_bias, BR, MOD)
    return dq_step(dq, raw_grad(ds, s, cap2, MOD), kk, PRECISION), dparam


@triton.jit
def _dkdv_tile(dk, dvv, kk, vv, b, j, n_keys, a0, q_base, do_base, stat_base, LSE, DELTA, base, offset, n_q, step,
               r, ubase, period, width, own, lo, hi, segment, sqn, sdn, scale2, BIAS, head, n_bias, cap2,
               D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr,
               KEYS: tl.constexpr, SEGMENTED: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
               MOD: tl.constexpr):
    """One query tile of the dK/dV pass (scores laid out ``(keys, queries)``)."""
    a = a0 + tl.arange(0, BM)
    i, row, valid_q, u = _query_coords(a, base, offset, n_q, step, r, ubase, period, width, own, KEYS)
    qq = load_rows(q_base, row, sqn, valid_q, D, BD)
    do = load_rows(do_base, row, sdn, valid_q, DV, BDV)
    lse2, delta = row_stats(LSE, DELTA, stat_base + row, valid_q)
    st = scores(kk, tl.trans(qq), scale2, PRECISION)
    if MOD != 0:
        st = modify(st, j[:, None] - i[None, :], BIAS, head, n_bias, cap2, MOD)
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED:
        pt = tl.where(_band_mask(u, b, i, j, n_keys, lo, hi, segment, SEGMENTED, True), pt, 0.0)
    return dkdv_step(dk, dvv, pt, st, qq, do, vv, delta, cap2, PRECISION, MOD)


# ---------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _band_fwd(
    Q, K, V, O, LSE, O_PREV, LSE_PREV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    n_batch, n_heads, n_kv_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, n_rows, n_mid, slot0, scale2, BIAS, n_bias, cap2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    KEYS: tl.constexpr, SEGMENTED: tl.constexpr, SPLITS: tl.constexpr, PACKED: tl.constexpr,
    MERGE: tl.constexpr, FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr,
):
    pid_m, pid_mid, pid_z = program_coords(tl.cdiv(n_rows, BM), n_mid, FOLDED)
    r = pid_z // SPLITS
    split = pid_z % SPLITS
    f = pid_m * BM + tl.arange(0, BM)
    if PACKED:  # program axis 1 runs over (batch, KV head); the tile's rows over its group's heads
        batch = pid_mid // n_kv_heads
        kv_head = pid_mid % n_kv_heads
        head_rows = n_rows // group
        head = kv_head * group + f // head_rows
        a = f % head_rows
        mod_head = tl.minimum(head, n_heads - 1)[:, None]  # rows past the group's read a real head's bias
    else:
        batch, head, kv_head = query_heads(pid_mid, n_heads, group)
        a = f
        mod_head = head
    i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop = _query_block(
        a, r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi, segment,
        BN, KEYS, SEGMENTED)
    if PACKED:
        valid_q = valid_q & (f < n_rows)
    per_split = (n_tiles + SPLITS - 1) // SPLITS
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, n_tiles)

    q_rows = head.to(tl.int64) * sqh + row.to(tl.int64) * sqn
    q = load_rows(Q + batch.to(tl.int64) * sqb, q_rows, 1, valid_q, D, BD)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for t in range(t0, tl.minimum(t_full, t1)):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, BIAS, mod_head, n_bias, cap2, D, DV, BD,
                                  BDV, BN, KEYS, SEGMENTED, True, PRECISION, MOD)
    for t in range(tl.maximum(t_full, t0), tl.minimum(t_stop, t1)):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, BIAS, mod_head, n_bias, cap2, D, DV, BD,
                                  BDV, BN, KEYS, SEGMENTED, False, PRECISION, MOD)
    for t in range(tl.maximum(tl.maximum(t_full, t_stop), t0), t1):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi, segment,
                                  r, step, period, width, skn, svn, scale2, BIAS, mod_head, n_bias, cap2, D, DV, BD,
                                  BDV, BN, KEYS, SEGMENTED, True, PRECISION, MOD)

    slot = (((slot0 + split) * n_batch + batch) * n_heads + head).to(tl.int64) * n_q + row
    store_forward(O, LSE, O_PREV, LSE_PREV, slot, acc, m_i, l_i, valid_q, DV, BDV, MERGE)


@triton.jit
def _band_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, DQ_IN, DQ_ACC,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, n_rows, n_mid, scale2, scale,
    BIAS, n_bias, cap2, DPARAM, n_granules,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    KEYS: tl.constexpr, SEGMENTED: tl.constexpr, READ_ACC: tl.constexpr, WRITE_ACC: tl.constexpr,
    FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr, BR: tl.constexpr,
):
    pid_m, pid_mid, r = program_coords(tl.cdiv(n_rows, BM), n_mid, FOLDED)
    batch, head, kv_head = query_heads(pid_mid, n_heads, group)
    i, row, valid_q, u, n_keys, b_start, n_tiles, t_full, t_stop = _query_block(
        pid_m * BM + tl.arange(0, BM), r, base, offset, n_q, n_k, step, ubase, period, width, own, n_summary, lo, hi,
        segment, BN, KEYS, SEGMENTED)

    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    do = load_rows(head_base(DO, batch, head, sdb, sdh), row, sdn, valid_q, DV, BDV)
    stat = (batch * n_heads + head).to(tl.int64) * n_q + row
    lse2, delta = row_stats(LSE, DELTA, stat, valid_q)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)

    dq = tl.zeros([BM, BD], tl.float32)
    dparam = tl.zeros([BR], tl.float32)
    for t in range(0, tl.minimum(t_full, n_tiles)):
        dq, dparam = _dq_tile(dq, dparam, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi,
                              segment, r, step, period, width, skn, svn, scale2, BIAS, head, n_bias, cap2, D, DV, BD,
                              BDV, BN, KEYS, SEGMENTED, True, PRECISION, MOD, BR)
    for t in range(t_full, tl.minimum(t_stop, n_tiles)):
        dq, dparam = _dq_tile(dq, dparam, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi,
                              segment, r, step, period, width, skn, svn, scale2, BIAS, head, n_bias, cap2, D, DV, BD,
                              BDV, BN, KEYS, SEGMENTED, False, PRECISION, MOD, BR)
    for t in range(tl.maximum(t_full, t_stop), n_tiles):
        dq, dparam = _dq_tile(dq, dparam, q, do, lse2, delta, k_base, v_base, b_start + t * BN, u, i, n_keys, lo, hi,
                              segment, r, step, period, width, skn, svn, scale2, BIAS, head, n_bias, cap2, D, DV, BD,
                              BDV, BN, KEYS, SEGMENTED, True, PRECISION, MOD, BR)
    store_grad_rows(DQ, DQ_IN, DQ_ACC, stat, dq * scale, valid_q, valid_q, D, BD, READ_ACC, WRITE_ACC)
    store_parameter(DPARAM, pid_mid * step + r, pid_m, n_granules, dparam, n_bias, BM, BR, MOD)


@triton.jit
def _band_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, DK_IN, DV_IN, DK_ACC, DV_ACC,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, n_kv_heads, group, n_q, n_k, offset, lo, hi,
    step, base, ubase, period, width, own, n_summary, segment, n_lattice, later_period, later_width,
    n_rows, n_mid, scale2, scale, BIAS, n_bias, cap2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    KEYS: tl.constexpr, SEGMENTED: tl.constexpr, READ_ACC: tl.constexpr, WRITE_ACC: tl.constexpr,
    FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr,
):
    pid_n, pid_mid, r = program_coords(tl.cdiv(n_rows, BN), n_mid, FOLDED)
    batch = pid_mid // n_kv_heads
    kv_head = pid_mid % n_kv_heads

    n_keys = _key_count(n_k, r, step, n_summary, KEYS)
    b0 = pid_n * BN
    b = b0 + tl.arange(0, BN)
    valid_k = b < n_keys
    j = _key_positions(b, r, step, period, width, KEYS)
    b_last = tl.minimum(b0 + BN, n_keys) - 1
    a_start, n_tiles, t_full, t_stop = _query_range(b0, b_last, r, lo, hi, base, ubase, n_lattice, step, period,
                                                     width, own, segment, KEYS, SEGMENTED, BM)

    kk = load_rows(head_base(K, batch, kv_head, skb, skh), j, skn, valid_k, D, BD)
    vv = load_rows(head_base(V, batch, kv_head, svb, svh), j, svn, valid_k, DV, BDV)
    dk = tl.zeros([BN, BD], tl.float32)
    dvv = tl.zeros([BN, BDV], tl.float32)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = head_base(Q, batch, head, sqb, sqh)
        do_base = head_base(DO, batch, head, sdb, sdh)
        stat_base = (batch * n_heads + head).to(tl.int64) * n_q
        for t in range(0, tl.minimum(t_full, n_tiles)):
            dk, dvv = _dkdv_tile(dk, dvv, kk, vv, b, j, n_keys, a_start + t * BM, q_base, do_base, stat_base, LSE,
                                 DELTA, base, offset, n_q, step, r, ubase, period, width, own, lo, hi, segment, sqn,
                                 sdn, scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BM, KEYS, SEGMENTED, True,
                                 PRECISION, MOD)
        for t in range(t_full, tl.minimum(t_stop, n_tiles)):
            dk, dvv = _dkdv_tile(dk, dvv, kk, vv, b, j, n_keys, a_start + t * BM, q_base, do_base, stat_base, LSE,
                                 DELTA, base, offset, n_q, step, r, ubase, period, width, own, lo, hi, segment, sqn,
                                 sdn, scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BM, KEYS, SEGMENTED, False,
                                 PRECISION, MOD)
        for t in range(tl.maximum(t_full, t_stop), n_tiles):
            dk, dvv = _dkdv_tile(dk, dvv, kk, vv, b, j, n_keys, a_start + t * BM, q_base, do_base, stat_base, LSE,
                                 DELTA, base, offset, n_q, step, r, ubase, period, width, own, lo, hi, segment, sqn,
                                 sdn, scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BM, KEYS, SEGMENTED, True,
                                 PRECISION, MOD)
    slot = (batch * n_kv_heads + kv_head).to(tl.int64) * n_k + j
    later = j % later_period >= later_period - later_width
    store_grad_rows(DK, DK_IN, DK_ACC, slot, dk * scale, valid_k, later, D, BD, READ_ACC, WRITE_ACC)
    store_grad_rows(DV_OUT, DV_IN, DV_ACC, slot, dvv, valid_k, later, DV, BDV, READ_ACC, WRITE_ACC)


_band_fwd_tuned = configs.autotuned("fwd", ["n_q", "n_k", "lo", "hi", "step", "D", "DV", "KEYS", "SEGMENTED", "MERGE",
                                                                                 "MOD"])(
    _band_fwd)
_band_bwd_dq_tuned = configs.autotuned("dq", ["n_q", "n_k", "lo", "hi", "step", "D", "DV", "KEYS", "SEGMENTED",
                                              "MOD"])(_band_bwd_dq)
_band_bwd_dkdv_tuned = configs.autotuned("dkdv", ["n_q", "n_k", "lo", "hi", "step", "D", "DV", "KEYS", "SEGMENTED",
                                                  "MOD"])(_band_bwd_dkdv)


# ---------------------------------------------------------------------------------------------
# Launchers


def _edge(x: float) -> int:
    return max(-_BIG_EDGE, min(_BIG_EDGE, int(x))) if math.isfinite(x) else (_BIG_EDGE if x > 0 else -_BIG_EDGE)


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

    def args(self, part: Piece) -> tuple:
        return (self.lo, self.hi, self.step, self.base, self.ubase, part.period, part.width,
                int(part.own), self.n_summary, max(part.segment, 1))


def _geometry(part: Piece, n_q: int, n_k: int) -> _Geometry:
    offset = n_k - n_q
    lo, hi = _edge(part.lo), _edge(part.hi)
    if part.keys == SUMMARY:
        if math.isfinite(part.hi) or part.lo < 0:  # the dK/dV pass's query range assumes it
            raise ValueError(f"summary keys need a band (lo >= 0, hi = inf), got {part}")
        n_summary = (n_k // part.period) * part.width + max(0, n_k % part.period - (part.period - part.width))
        return _Geometry(lo, hi, 1, offset, 0, n_q, n_summary, 1, n_summary)
    step = part.step
    base = (offset // step) * step
    n_lattice = -(-(offset + n_q - base) // step)
    return _Geometry(lo, hi, step, base, base // step, n_lattice, 0, step, -(-n_k // step))


def _part_flags(part: Piece) -> dict:
    return dict(KEYS=int(part.keys == SUMMARY), SEGMENTED=part.segment > 0)


def band_forward(part: Piece, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 out: torch.Tensor, lse: torch.Tensor, prev: tuple | None = None,
                 decode: tuple[int, int] | None = None, score_mod: ScoreMod | None = None) -> None:
    """Run one part forward into ``out``/``lse``.

    A full-size call: ``out (B, Hq, Nq, Dv)`` in its dtype and ``lse (B, Hq, Nq)`` float32, merged
    by LSE with ``prev = (out, lse)`` of the parts before (float32) when given. A decode-sized call
    (``decode = (splits, slot0)``: the decode configuration, a GQA group's heads packed into the
    query tile): float32 partials ``out (S, B, Hq, Nq, Dv)`` and ``lse (S, B, Hq, Nq)``, this
    part's ``splits`` key shares at slots ``slot0, slot0 + 1, ...``, for
    :func:`~attnkit.kernels.triton_merge.merge_partials`. ``score_mod``: softcap, alibi or
    distance_bias (:mod:`~attnkit.kernels.triton_mods`), its parameter with ``Hq`` rows."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    group = n_heads // n_kv
    geo = _geometry(part, n_q, n_k)
    common = dict(configs.kernel_dims(q, v), **_part_flags(part))
    merge = prev is not None
    prev_out, prev_lse = prev if merge else (out, lse)
    packed = decode is not None
    splits, slot0 = decode or (1, 0)
    rows, mid = (geo.n_lattice * group, batch * n_kv) if packed else (geo.n_lattice, batch * n_heads)
    shape, folded = configs.grid(rows, mid, geo.residues * splits)
    args = (q, k, v, out, lse, prev_out, prev_lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            batch, n_heads, n_kv, group, n_q, n_k, n_k - n_q, *geo.args(part), rows, mid, slot0, scale * LOG2E)
    mod = mod_arguments(score_mod)
    flags = dict(common, **mod, SPLITS=splits, PACKED=packed, MERGE=merge, FOLDED=folded)
    if packed:
        bm, bn, warps, stages = decode_tiles(q, v, score_mod)
        configs.launch(_band_fwd, shape, *args, BM=bm, BN=bn, **flags, num_warps=warps, num_stages=stages)
    else:
        configs.launch(_band_fwd_tuned, shape, *args, **flags)


def decode_tiles(q: torch.Tensor, v: torch.Tensor, score_mod: ScoreMod | None = None) -> tuple[int, int, int, int]:
    """``(BM, BN, warps, stages)`` of the decode configuration for these inputs (on their device)
    with ``score_mod``."""
    return configs.decode_tiles(q.shape[-1], v.shape[-1], q.element_size(), q.device, mod_code(score_mod))


def band_backward(part: Piece, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                  lse: torch.Tensor, delta: torch.Tensor, scale: float, grads: tuple, accumulate: tuple,
                  later: tuple[int, int] | None, score_mod: ScoreMod | None = None) -> torch.Tensor | None:
    """One part's share of the gradients given the *final* ``lse`` and ``delta = rowsum(dO * O) -
    dLSE`` (both ``(B, Hq, Nq)`` float32 contiguous), stored into ``grads = (dq, dk, dv)``
    (contiguous, the input dtypes) as :func:`~attnkit.kernels.triton_tiles.store_grad_rows` says:
    ``accumulate = (read, write)``, each None or a float32 ``(dq, dk, dv)`` scratch; ``later`` is
    the ``touched_keys`` of the parts after this one (None: none). Returns this part's share of
    the gradient of ``score_mod``'s parameter, ``(Hq, 1 or R)`` float32 (None: it has none)."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    geo = _geometry(part, n_q, n_k)
    read, write = accumulate
    dq, dk, dv = grads
    dq_in, dk_in, dv_in = read or grads
    dq_acc, dk_acc, dv_acc = write or grads
    common = dict(configs.kernel_dims(q, v), **_part_flags(part), READ_ACC=read is not None,
                  WRITE_ACC=write is not None)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    mod = mod_arguments(score_mod, parameter_grad=True)
    partials = partial_buffer(mod, q.device, batch * n_heads * geo.residues, geo.n_lattice)
    shape, folded = configs.grid(geo.n_lattice, batch * n_heads, geo.residues)
    configs.launch(
        _band_bwd_dq_tuned, shape, q, k, v, grad_out, lse, delta, dq, dq_in, dq_acc, *strides,
        n_heads, n_heads // n_kv, n_q, n_k, n_k - n_q, *geo.args(part), geo.n_lattice, batch * n_heads,
        scale * LOG2E, scale, DPARAM=partials, n_granules=None if partials is None else partials.shape[1],
        **common, **mod, FOLDED=folded,
    )
    later_period, later_width = later or (1, 0)  # (1, 0): no key is touched later
    shape, folded = configs.grid(geo.key_slots, batch * n_kv, geo.residues, block="BN")
    configs.launch(
        _band_bwd_dkdv_tuned, shape, q, k, v, grad_out, lse, delta, dk, dv, dk_in, dv_in, dk_acc, dv_acc, *strides,
        n_heads, n_kv, n_heads // n_kv, n_q, n_k, n_k - n_q, *geo.args(part), geo.n_lattice, later_period,
        later_width, geo.key_slots, batch * n_kv, scale * LOG2E, scale, **common, **mod_arguments(score_mod),
        FOLDED=folded,
    )
    return None if partials is None else reduce_partials(partials, batch, n_heads)


def key_tiles(part: Piece, n_q: int, n_k: int, block_n: int) -> int:
    """Key tiles of ``block_n`` keys the widest query tile of a decode-sized call (``n_q`` small) walks."""
    geo = _geometry(part, n_q, n_k)
    span = min(geo.hi - geo.lo + 1 + n_q, geo.key_slots)
    return triton.cdiv(max(span, 1), block_n)
