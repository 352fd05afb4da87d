"""Triton block-sparse attention: each query block walks a list of key blocks, forward and backward.

The FlexAttention ``BlockMask`` idea, exact: a :class:`BlockList` says, for every block of ``blk``
query rows, which blocks of ``blk`` keys hold an allowed pair and whether the block is *full*
(every pair allowed: no element mask) or *partial*. A partial block reads its element mask from a
small table of distinct ``blk x blk`` masks evaluated once from the pattern's predicate on that
block alone (``BlockSparse`` layouts aligned to the kernel blocks have none). The transposed lists
drive the dK/dV pass, so the backward pass, like the forward, touches only the listed blocks and
uses no atomics. Softmax statistics are float32 with exp2, and row and key indices are widened to
int64 before they meet a stride, as in :mod:`~attnkit.kernels.triton_band`.

Lists are built from the pattern's block layout (``BlockSparse``: pooled from its layout; unions
and intersections: combined from their sides; other patterns: :meth:`Pattern.block_layout`) and
cached per (pattern, sizes, block, device).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..patterns import BlockSparse, Intersection, Pattern, Union
from .triton_band import _pow2, _precision, block_sizes
from .triton_tiles import dkdv_step, dot, dq_inputs, dq_step, head_base, load_cols, load_rows, query_heads, row_stats
from .triton_tiles import softmax_step, store_forward, store_rows

_LOG2E = math.log2(math.e)
_EVAL_CHUNK = 1 << 22  # predicate evaluations at once while classifying blocks


@dataclass(frozen=True, eq=False)
class BlockList:
    """Block lists of one pattern for an ``n_q x n_k`` problem cut into ``blk`` blocks.

    ``kv_index, kv_mask (nqb, max_kv)`` int32 and ``kv_count (nqb,)``: the key blocks of each query
    block and their mask ids (-1: full); ``q_index, q_mask (nkb, max_q)`` and ``q_count``: the
    transpose; ``masks (n_masks, blk, blk)`` int8 (at least one row, unused when empty).
    """

    blk: int
    kv_index: torch.Tensor
    kv_mask: torch.Tensor
    kv_count: torch.Tensor
    q_index: torch.Tensor
    q_mask: torch.Tensor
    q_count: torch.Tensor
    masks: torch.Tensor


def _touch(n_blocks: int, blk: int, start: int, n: int, size: int, n_target: int) -> torch.Tensor:
    """``(n_blocks, n_target)`` bool: which ``size``-blocks of absolute positions each kernel block
    of ``blk`` (rows ``[0, n)`` at positions ``start + row``) touches."""
    pos = start + torch.arange(n)
    owner = torch.arange(n) // blk
    touched = torch.zeros(n_blocks, n_target, dtype=torch.bool)
    real = pos >= 0
    touched[owner[real], (pos[real] // size).clamp(max=n_target - 1)] = True
    return touched


def _layout(pattern: Pattern, n_q: int, n_k: int, blk: int) -> torch.Tensor:
    """``(nqb, nkb)`` bool, True where a kernel block may hold an allowed pair (a superset is fine:
    every listed block is classified exactly afterwards)."""
    nqb, nkb = -(-n_q // blk), -(-n_k // blk)
    if isinstance(pattern, BlockSparse) and pattern.n_heads is None:
        rows = _touch(nqb, blk, n_k - n_q, n_q, pattern.block_size, pattern.n_blocks).float()
        cols = _touch(nkb, blk, 0, n_k, pattern.block_size, pattern.n_blocks).float()
        return (rows @ pattern.layout.float() @ cols.T) > 0
    if isinstance(pattern, Union):
        return _layout(pattern.left, n_q, n_k, blk) | _layout(pattern.right, n_q, n_k, blk)
    if isinstance(pattern, Intersection):
        return _layout(pattern.left, n_q, n_k, blk) & _layout(pattern.right, n_q, n_k, blk)
    return pattern.block_layout(n_q, n_k, blk)


def _padded(lists: list[list[int]], fill: int) -> torch.Tensor:
    width = max(1, max((len(x) for x in lists), default=1))
    return torch.tensor([x + [fill] * (width - len(x)) for x in lists], dtype=torch.int32)


@functools.lru_cache(maxsize=16)
def block_list(pattern: Pattern, n_q: int, n_k: int, blk: int, device: torch.device) -> BlockList:
    """The block lists of ``pattern`` (no head dimension), evaluated on the listed blocks only."""
    offset = n_k - n_q
    layout = _layout(pattern, n_q, n_k, blk)
    qb, kb = layout.nonzero(as_tuple=True)
    local = torch.arange(blk)
    q_rows, k_cols = qb[:, None] * blk + local, kb[:, None] * blk + local  # (P, blk)
    # Per chunk of blocks: drop empty ones, mark full ones, keep only the distinct partial masks.
    step = max(1, _EVAL_CHUNK // (blk * blk))
    kept, ids, distinct = [], [], []
    n_distinct = 0
    for s in range(0, len(qb), step):
        rows, cols = q_rows[s : s + step], k_cols[s : s + step]
        # padding rows/columns are clamped into range for the predicate, then masked out
        ok = pattern.allows((rows + offset).clamp(max=n_k - 1)[:, :, None], cols.clamp(max=n_k - 1)[:, None, :])
        ok = (ok & (rows < n_q)[:, :, None] & (cols < n_k)[:, None, :]).flatten(1)
        nonempty, full = ok.any(1), ok.all(1)
        chunk_ids = torch.full((len(ok),), -1, dtype=torch.long)
        partial = nonempty & ~full
        if bool(partial.any()):
            masks, inverse = torch.unique(ok[partial], dim=0, return_inverse=True)
            chunk_ids[partial] = inverse + n_distinct
            distinct.append(masks)
            n_distinct += len(masks)
        kept.append(s + nonempty.nonzero().flatten())
        ids.append(chunk_ids[nonempty])
    keep = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    qb, kb = qb[keep], kb[keep]
    mask_id = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    masks = torch.zeros(1, blk, blk, dtype=torch.int8)
    if distinct:  # chunks may share masks: one table without duplicates
        table, inverse = torch.unique(torch.cat(distinct), dim=0, return_inverse=True)
        mask_id = torch.where(mask_id >= 0, inverse[mask_id.clamp(min=0)], mask_id)
        masks = table.view(-1, blk, blk).to(torch.int8)
    nqb, nkb = -(-n_q // blk), -(-n_k // blk)
    by_q = [[] for _ in range(nqb)]
    by_k = [[] for _ in range(nkb)]
    for a, b, m in zip(qb.tolist(), kb.tolist(), mask_id.tolist()):
        by_q[a].append((b, m))
        by_k[b].append((a, m))
    tensors = (
        _padded([[b for b, _ in x] for x in by_q], 0), _padded([[m for _, m in x] for x in by_q], -1),
        torch.tensor([len(x) for x in by_q], dtype=torch.int32),
        _padded([[a for a, _ in x] for x in by_k], 0), _padded([[m for _, m in x] for x in by_k], -1),
        torch.tensor([len(x) for x in by_k], dtype=torch.int32), masks,
    )
    return BlockList(blk, *(t.to(device) for t in tensors))


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
def _listed_block(INDEX, MASK, owner, max_listed, t, limit, BLK: tl.constexpr):
    """Entry ``t`` of block ``owner``'s list: ``(mask_id, indices, valid)`` of the listed block."""
    block = tl.load(INDEX + owner * max_listed + t)
    mask_id = tl.load(MASK + owner * max_listed + t)
    idx = block * BLK + tl.arange(0, BLK)
    return mask_id, idx, idx < limit


@triton.jit
def _blocks_fwd(
    Q, K, V, O, LSE, KV_INDEX, KV_MASK, KV_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    n_heads, group, n_q, n_k, max_kv, scale2,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head, kv_head = query_heads(bh, n_heads, group)
    row = qb * BLK + tl.arange(0, BLK)
    valid_q = row < n_q
    q = load_rows(head_base(Q, batch, head, sqb, sqh), row, sqn, valid_q, D, BD)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)
    m_i = tl.full([BLK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLK], tl.float32)
    acc = tl.zeros([BLK, BDV], tl.float32)
    for t in range(0, tl.load(KV_COUNT + qb)):
        mask_id, col, valid_k = _listed_block(KV_INDEX, KV_MASK, qb, max_kv, t, n_k, BLK)
        s = dot(q, load_cols(k_base, col, skn, valid_k, D, BD), PRECISION) * scale2
        if mask_id >= 0:
            s = tl.where(_mask_tile(MASKS, mask_id, BLK, False) != 0, s, float("-inf"))
        acc, m_i, l_i = softmax_step(acc, m_i, l_i, s, load_rows(v_base, col, svn, valid_k, DV, BDV), PRECISION)
    store_forward(O, LSE, (batch * n_heads + head).to(tl.int64) * n_q + row, acc, m_i, l_i, valid_q, DV, BDV)


@triton.jit
def _blocks_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KV_INDEX, KV_MASK, KV_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, group, n_q, n_k, max_kv, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr, PRECISION: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head, kv_head = query_heads(bh, n_heads, group)
    row = qb * BLK + tl.arange(0, BLK)
    valid_q = row < n_q
    q, do, stat, lse2, delta = dq_inputs(Q, DO, LSE, DELTA, batch, head, row, valid_q, sqb, sqh, sqn, sdb, sdh, sdn,
                                         n_heads, n_q, D, DV, BD, BDV)
    k_base, v_base = head_base(K, batch, kv_head, skb, skh), head_base(V, batch, kv_head, svb, svh)
    dq = tl.zeros([BLK, BD], tl.float32)
    for t in range(0, tl.load(KV_COUNT + qb)):
        mask_id, col, valid_k = _listed_block(KV_INDEX, KV_MASK, qb, max_kv, t, n_k, BLK)
        kk = load_rows(k_base, col, skn, valid_k, D, BD)
        vt = load_cols(v_base, col, svn, valid_k, DV, BDV)
        p = tl.math.exp2(dot(q, tl.trans(kk), PRECISION) * scale2 - lse2[:, None])
        if mask_id >= 0:
            p = tl.where(_mask_tile(MASKS, mask_id, BLK, False) != 0, p, 0.0)
        dq = dq_step(dq, p, do, vt, kk, delta, PRECISION)
    store_rows(DQ, stat, dq * scale, valid_q, D, BD)


@triton.jit
def _blocks_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV_OUT, Q_INDEX, Q_MASK, Q_COUNT, MASKS,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    n_heads, n_kv_heads, group, n_q, n_k, max_q, scale2, scale,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BLK: tl.constexpr, PRECISION: tl.constexpr,
):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    batch = bh // n_kv_heads
    kv_head = bh % n_kv_heads
    col = kb * BLK + tl.arange(0, BLK)
    valid_k = col < n_k
    kk = load_rows(head_base(K, batch, kv_head, skb, skh), col, skn, valid_k, D, BD)
    vv = load_rows(head_base(V, batch, kv_head, svb, svh), col, svn, valid_k, DV, BDV)
    dk = tl.zeros([BLK, BD], tl.float32)
    dvv = tl.zeros([BLK, BDV], tl.float32)
    count = tl.load(Q_COUNT + kb)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = head_base(Q, batch, head, sqb, sqh)
        do_base = head_base(DO, batch, head, sdb, sdh)
        stat_base = (batch * n_heads + head).to(tl.int64) * n_q
        for t in range(0, count):
            mask_id, row, valid_q = _listed_block(Q_INDEX, Q_MASK, kb, max_q, t, n_q, BLK)
            qq = load_rows(q_base, row, sqn, valid_q, D, BD)
            do = load_rows(do_base, row, sdn, valid_q, DV, BDV)
            lse2, delta = row_stats(LSE, DELTA, stat_base + row, valid_q)
            pt = tl.math.exp2(dot(kk, tl.trans(qq), PRECISION) * scale2 - lse2[None, :])
            if mask_id >= 0:
                pt = tl.where(_mask_tile(MASKS, mask_id, BLK, True) != 0, pt, 0.0)
            dk, dvv = dkdv_step(dk, dvv, pt, qq, do, vv, delta, PRECISION)
    slot = (batch * n_kv_heads + kv_head).to(tl.int64) * n_k + col
    store_rows(DK, slot, dk * scale, valid_k, D, BD)
    store_rows(DV_OUT, slot, dvv, valid_k, DV, BDV)


@dataclass(frozen=True, eq=False)
class BlocksPart:
    """A part run by the block-list kernel: the pattern (no head dimension) it evaluates."""

    pattern: Pattern

    def lists(self, q: torch.Tensor, n_k: int, value_dim: int) -> BlockList:
        blk, _, _, _ = block_sizes(q.shape[-1], value_dim, True, q.element_size())
        return block_list(self.pattern, q.shape[2], n_k, blk, q.device)


def blocks_forward(part: BlocksPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``out (1, B, Hq, Nq, Dv)`` in ``out_dtype`` and ``lse (1, B, Hq, Nq)`` float32 (shapes as
    :func:`~attnkit.kernels.triton_band.band_forward` with one share)."""
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    lists = part.lists(q, n_k, value_dim)
    _, _, warps, stages = block_sizes(head_dim, value_dim, True, q.element_size())
    out = torch.empty(1, batch, n_heads, n_q, value_dim, device=q.device, dtype=out_dtype)
    lse = torch.empty(1, batch, n_heads, n_q, device=q.device, dtype=torch.float32)
    _blocks_fwd[(len(lists.kv_count), batch * n_heads)](
        q, k, v, out, lse, lists.kv_index, lists.kv_mask, lists.kv_count, lists.masks,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        n_heads, n_heads // n_kv, n_q, n_k, lists.kv_index.shape[1], scale * _LOG2E,
        D=head_dim, DV=value_dim, BD=_pow2(head_dim), BDV=_pow2(value_dim), BLK=lists.blk,
        PRECISION=_precision(q), num_warps=warps, num_stages=stages,
    )
    return out, lse


def blocks_backward(part: BlocksPart, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                    lse: torch.Tensor, delta: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` float32 of one part given the final ``lse`` and ``delta`` (see
    :func:`~attnkit.kernels.triton_band.band_backward`)."""
    batch, n_heads, n_q, head_dim = q.shape
    n_kv, n_k, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    lists = part.lists(q, n_k, value_dim)
    _, _, warps, stages = block_sizes(head_dim, value_dim, True, q.element_size())
    dq = torch.empty(batch, n_heads, n_q, head_dim, device=q.device, dtype=torch.float32)
    dk = torch.empty(batch, n_kv, n_k, head_dim, device=q.device, dtype=torch.float32)
    dv = torch.empty(batch, n_kv, n_k, value_dim, device=q.device, dtype=torch.float32)
    common = dict(D=head_dim, DV=value_dim, BD=_pow2(head_dim), BDV=_pow2(value_dim), BLK=lists.blk,
                  PRECISION=_precision(q), num_warps=warps, num_stages=stages)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    _blocks_bwd_dq[(len(lists.kv_count), batch * n_heads)](
        q, k, v, grad_out, lse, delta, dq, lists.kv_index, lists.kv_mask, lists.kv_count, lists.masks, *strides,
        n_heads, n_heads // n_kv, n_q, n_k, lists.kv_index.shape[1], scale * _LOG2E, scale, **common,
    )
    _blocks_bwd_dkdv[(len(lists.q_count), batch * n_kv)](
        q, k, v, grad_out, lse, delta, dk, dv, lists.q_index, lists.q_mask, lists.q_count, lists.masks, *strides,
        n_heads, n_kv, n_heads // n_kv, n_q, n_k, lists.q_index.shape[1], scale * _LOG2E, scale, **common,
    )
    return dq, dk, dv
