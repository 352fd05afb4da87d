"""Triton block-sparse attention: each query block walks a list of key blocks, forward and backward.

The lists come from :mod:`~attnkit.kernels.triton_lists` (built on the device, cached by the
pattern's value): per query block its *full* key blocks (no element mask) and its *partial* ones
(an element mask from a small table), and the same transposed for the dK/dV pass. Each kernel runs
the full blocks and the partial blocks in two loops (the mask is a ``constexpr`` choice per loop,
so the full loop is free of branches), touches only the listed blocks and uses no atomics.
Softmax statistics are float32 with exp2; gradients are stored in the input dtype. A score
modification applies as in :mod:`~attnkit.kernels.triton_band` (query row ``r`` at position
``r + Nk - Nq``, key ``j`` at ``j``). Row and key
indices are widened to int64 before they meet a stride, as in :mod:`~attnkit.kernels.triton_band`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import triton_configs as configs
from ..patterns import Pattern
from .triton_lists import BlockList, block_list
from .score_mods import ScoreMod
from .triton_mods import mod_arguments, mod_code, modify, parameter_step, partial_buffer, raw_grad
from .triton_mods import reduce_partials, store_parameter
from .triton_tiles import LOG2E, dkdv_step, dq_step, head_base, load_cols, load_rows, program_coords, query_heads
from .triton_tiles import row_stats, score_grad, scores, softmax_step, store_forward, store_rows


@triton.jit
def _mask_tile(MASKS, mask_id, BLK: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The ``(BLK, BLK)`` element mask ``mask_id`` (the table holds ``[query, key]``), nonzero where allowed."""
    local = tl.arange(0, BLK)
    if TRANSPOSED:
        ok = tl.load(MASKS + mask_id.to(tl.int64) * BLK * BLK + local[None, :] * BLK + local[:, None])
    else:
        ok = tl.load(MASKS + mask_id.to(tl.int64) * BLK * BLK + local[:, None] * BLK + local[None, :])
    return ok


@triton.jit
def _listed(INDEX, owner, width, t, limit, BLK: tl.constexpr):
    """Entry ``t`` of block ``owner``'s list: the listed block's indices and their validity."""
    block = tl.load(INDEX + owner * width + t)
    idx = block * BLK + tl.arange(0, BLK)
    return idx, idx < limit


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, i, col, valid_k, MASKS, mask_id, skn, svn, scale2, BIAS, head,
               n_bias, cap2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               BLK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr):
    s = scores(q, load_cols(k_base, col, skn, valid_k, D, BD), scale2, PRECISION)
    if MOD != 0:
        s = modify(s, col[None, :] - i[:, None], BIAS, head, n_bias, cap2, MOD)
    if MASKED:
        s = tl.where(_mask_tile(MASKS, mask_id, BLK, False) != 0, s, float("-inf"))
    return softmax_step(acc, m_i, l_i, s, load_rows(v_base, col, svn, valid_k, DV, BDV), PRECISION)


@triton.jit
def _dq_block(dq, dparam, q, do, lse2, delta, k_base, v_base, i, col, valid_k, MASKS, mask_id, skn, svn, scale2,
              BIAS, head, n_bias, cap2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              BLK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr,
              BR: tl.constexpr):
    kk = load_rows(k_base, col, skn, valid_k, D, BD)
    vt = load_cols(v_base, col, svn, valid_k, DV, BDV)
    s = scores(q, tl.trans(kk), scale2, PRECISION)
    if MOD != 0:
        offset = col[None, :] - i[:, None]
        s = modify(s, offset, BIAS, head, n_bias, cap2, MOD)
    p = tl.math.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(_mask_tile(MASKS, mask_id, BLK, False) != 0, p, 0.0)
    ds = score_grad(p, do, vt, delta, PRECISION)
    if MOD >= 2:
        dparam = parameter_step(dparam, ds, offset, n_bias, BR, MOD)
    return dq_step(dq, raw_grad(ds, s, cap2, MOD), kk, PRECISION), dparam


@triton.jit
def _dkdv_block(dk, dvv, kk, vv, col, row, valid_q, q_base, do_base, stat_base, LSE, DELTA, MASKS, mask_id, sqn, sdn,
                scale2, first, BIAS, head, n_bias, cap2, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr,
                BDV: tl.constexpr, BLK: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                MOD: tl.constexpr):
    qq = load_rows(q_base, row, sqn, valid_q, D, BD)
    do = load_rows(do_base, row, sdn, valid_q, DV, BDV)
    lse2, delta = row_stats(LSE, DELTA, stat_base + row, valid_q)
    st = scores(kk, tl.trans(qq), scale2, PRECISION)
    if MOD != 0:
        st = modify(st, col[:, None] - (first + row)[None, :], BIAS, head, n_bias, cap2, MOD)
    pt = tl.math.exp2(st - lse2[None, :])
    if MASKED:
        pt = tl.where(_mask_tile(MASKS, mask_id, BLK, True) != 0, pt, 0.0)
    return dkdv_step(dk, dvv, pt, st, qq, do, vv, delta, cap2, PRECISION, MOD)


@triton.jit
def _blocks_fwd(
    Q, K, V, O, LSE, FULL, FULL_COUNT, PARTIAL, PARTIAL_MASK, PARTIAL_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    n_heads, group, n_q, n_k, full_width, partial_width, n_mid, scale2, BIAS, n_bias, cap2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr,
    FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr,
):
    qb, bh, _ = program_coords(tl.cdiv(n_q, BLK), n_mid, FOLDED)
    batch, head, kv_head = query_heads(bh, n_heads, group)
    row = qb * BLK + tl.arange(0, BLK)
    valid_q = row < n_q
    i = row + (n_k - n_q)  # query positions
    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)
    m_i = tl.full([BLK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLK], tl.float32)
    acc = tl.zeros([BLK, BDV], tl.float32)
    for t in range(0, tl.load(FULL_COUNT + qb)):
        col, valid_k = _listed(FULL, qb, full_width, t, n_k, BLK)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, i, col, valid_k, MASKS, 0, skn, svn, scale2,
                                   BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK, False, PRECISION, MOD)
    for t in range(0, tl.load(PARTIAL_COUNT + qb)):
        col, valid_k = _listed(PARTIAL, qb, partial_width, t, n_k, BLK)
        mask_id = tl.load(PARTIAL_MASK + qb * partial_width + t)
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, i, col, valid_k, MASKS, mask_id, skn, svn,
                                   scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK, True, PRECISION, MOD)
    slot = (batch * n_heads + head).to(tl.int64) * n_q + row
    store_forward(O, LSE, O, LSE, slot, acc, m_i, l_i, valid_q, DV, BDV, False)


@triton.jit
def _blocks_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, FULL, FULL_COUNT, PARTIAL, PARTIAL_MASK, PARTIAL_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, group, n_q, n_k, full_width, partial_width, n_mid, scale2, scale,
    BIAS, n_bias, cap2, DPARAM, n_granules,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr,
    FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr, BR: tl.constexpr,
):
    qb, bh, _ = program_coords(tl.cdiv(n_q, BLK), n_mid, FOLDED)
    batch, head, kv_head = query_heads(bh, n_heads, group)
    row = qb * BLK + tl.arange(0, BLK)
    valid_q = row < n_q
    i = row + (n_k - n_q)
    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    do = load_rows(head_base(DO, batch, head, sdb, sdh), row, sdn, valid_q, DV, BDV)
    stat = (batch * n_heads + head).to(tl.int64) * n_q + row
    lse2, delta = row_stats(LSE, DELTA, stat, valid_q)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)
    dq = tl.zeros([BLK, BD], tl.float32)
    dparam = tl.zeros([BR], tl.float32)
    for t in range(0, tl.load(FULL_COUNT + qb)):
        col, valid_k = _listed(FULL, qb, full_width, t, n_k, BLK)
        dq, dparam = _dq_block(dq, dparam, q, do, lse2, delta, k_base, v_base, i, col, valid_k, MASKS, 0, skn, svn,
                               scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK, False, PRECISION, MOD, BR)
    for t in range(0, tl.load(PARTIAL_COUNT + qb)):
        col, valid_k = _listed(PARTIAL, qb, partial_width, t, n_k, BLK)
        mask_id = tl.load(PARTIAL_MASK + qb * partial_width + t)
        dq, dparam = _dq_block(dq, dparam, q, do, lse2, delta, k_base, v_base, i, col, valid_k, MASKS, mask_id, skn,
                               svn, scale2, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK, True, PRECISION, MOD, BR)
    store_rows(DQ, stat, dq * scale, valid_q, D, BD)
    store_parameter(DPARAM, bh, qb, n_granules, dparam, n_bias, BLK, BR, MOD)


@triton.jit
def _blocks_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, FULL, FULL_COUNT, PARTIAL, PARTIAL_MASK, PARTIAL_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, n_kv_heads, group, n_q, n_k, full_width, partial_width, n_mid, scale2, scale, BIAS, n_bias, cap2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr,
    FOLDED: tl.constexpr, PRECISION: tl.constexpr, MOD: tl.constexpr,
):
    kb, bh, _ = program_coords(tl.cdiv(n_k, BLK), n_mid, FOLDED)
    batch = bh // n_kv_heads
    kv_head = bh % n_kv_heads
    col = kb * BLK + tl.arange(0, BLK)
    valid_k = col < n_k
    kk = load_rows(head_base(K, batch, kv_head, skb, skh), col, skn, valid_k, D, BD)
    vv = load_rows(head_base(V, batch, kv_head, svb, svh), col, svn, valid_k, DV, BDV)
    dk = tl.zeros([BLK, BD], tl.float32)
    dvv = tl.zeros([BLK, BDV], tl.float32)
    n_full = tl.load(FULL_COUNT + kb)
    n_partial = tl.load(PARTIAL_COUNT + kb)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = head_base(Q, batch, head, sqb, sqh)
        do_base = head_base(DO, batch, head, sdb, sdh)
        stat_base = (batch * n_heads + head).to(tl.int64) * n_q
        for t in range(0, n_full):
            row, valid_q = _listed(FULL, kb, full_width, t, n_q, BLK)
            dk, dvv = _dkdv_block(dk, dvv, kk, vv, col, row, valid_q, q_base, do_base, stat_base, LSE, DELTA, MASKS, 0,
                                  sqn, sdn, scale2, n_k - n_q, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK, False,
                                  PRECISION, MOD)
        for t in range(0, n_partial):
            row, valid_q = _listed(PARTIAL, kb, partial_width, t, n_q, BLK)
            mask_id = tl.load(PARTIAL_MASK + kb * partial_width + t)
            dk, dvv = _dkdv_block(dk, dvv, kk, vv, col, row, valid_q, q_base, do_base, stat_base, LSE, DELTA, MASKS,
                                  mask_id, sqn, sdn, scale2, n_k - n_q, BIAS, head, n_bias, cap2, D, DV, BD, BDV, BLK,
                                  True, PRECISION, MOD)
    slot = (batch * n_kv_heads + kv_head).to(tl.int64) * n_k + col
    store_rows(DK, slot, dk * scale, valid_k, D, BD)
    store_rows(DV_OUT, slot, dvv, valid_k, DV, BDV)


_KEY = ["n_q", "n_k", "D", "DV", "BLK", "MOD"]
_blocks_fwd_tuned = configs.autotuned("blocks", _KEY)(_blocks_fwd)
_blocks_bwd_dq_tuned = configs.autotuned("blocks_dq", _KEY)(_blocks_bwd_dq)
_blocks_bwd_dkdv_tuned = configs.autotuned("blocks_dkdv", _KEY)(_blocks_bwd_dkdv)


@dataclass(frozen=True, eq=False)
class BlocksPart:
    """A part run by the block-list kernels: the pattern (no head dimension) it evaluates."""

    pattern: Pattern

    def lists(self, q: torch.Tensor, n_k: int, value_dim: int, score_mod: ScoreMod | None = None) -> BlockList:
        blk = configs.block_size(q.shape[-1], value_dim, q.element_size(), q.device, mod_code(score_mod))
        return block_list(self.pattern, q.shape[2], n_k, blk, q.device)


def _list_args(lists) -> tuple:
    return (lists.full, lists.full_count, lists.partial, lists.mask, lists.partial_count)


def _widths(lists) -> tuple[int, int]:
    return lists.full.shape[1], lists.partial.shape[1]


def blocks_forward(part: BlocksPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   out: torch.Tensor, lse: torch.Tensor, score_mod: ScoreMod | None = None) -> None:
    """Run the part forward into ``out (B, Hq, Nq, Dv)`` (its dtype) and ``lse (B, Hq, Nq)`` float32,
    with ``score_mod`` (softcap, alibi, distance_bias; None: none) applied."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    lists = part.lists(q, n_k, v.shape[-1], score_mod)
    shape, folded = configs.grid(n_q, batch * n_heads, 1, block="BLK")
    configs.launch(
        _blocks_fwd_tuned, shape, q, k, v, out, lse, *_list_args(lists.by_query), lists.masks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        n_heads, n_heads // n_kv, n_q, n_k, *_widths(lists.by_query), batch * n_heads, scale * LOG2E,
        **configs.kernel_dims(q, v), **mod_arguments(score_mod), BLK=lists.blk, FOLDED=folded,
    )


def blocks_backward(part: BlocksPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                    lse: torch.Tensor, delta: torch.Tensor, scale: float, grads: tuple,
                    score_mod: ScoreMod | None = None) -> torch.Tensor | None:
    """The gradients into ``grads = (dq, dk, dv)`` (contiguous, the input dtypes), given the final
    ``lse`` and ``delta`` (see :func:`~attnkit.kernels.triton_band.band_backward`); returns the
    gradient of ``score_mod``'s parameter, ``(Hq, 1 or R)`` float32 (None: it has none)."""
    batch, n_heads, n_q, _ = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    lists = part.lists(q, n_k, v.shape[-1], score_mod)
    dq, dk, dv = grads
    common = dict(configs.kernel_dims(q, v), BLK=lists.blk)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    mod = mod_arguments(score_mod, parameter_grad=True)
    partials = partial_buffer(mod, q.device, batch * n_heads, n_q)
    shape, folded = configs.grid(n_q, batch * n_heads, 1, block="BLK")
    configs.launch(
        _blocks_bwd_dq_tuned, shape, q, k, v, grad_out, lse, delta, dq, *_list_args(lists.by_query), lists.masks,
        *strides, n_heads, n_heads // n_kv, n_q, n_k, *_widths(lists.by_query), batch * n_heads, scale * LOG2E, scale,
        DPARAM=partials, n_granules=None if partials is None else partials.shape[1], **common, **mod, FOLDED=folded,
    )
    shape, folded = configs.grid(n_k, batch * n_kv, 1, block="BLK")
    configs.launch(
        _blocks_bwd_dkdv_tuned, shape, q, k, v, grad_out, lse, delta, dk, dv, *_list_args(lists.by_key), lists.masks,
        *strides, n_heads, n_kv, n_heads // n_kv, n_q, n_k, *_widths(lists.by_key), batch * n_kv, scale * LOG2E, scale,
        **common, **mod_arguments(score_mod), FOLDED=folded,
    )
    return None if partials is None else reduce_partials(partials, batch, n_heads)
