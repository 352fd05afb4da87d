"""Tiled attention with an online softmax over key/value tiles, and the LSE merge.

Queries are cut into blocks of ``block_q`` rows and keys into tiles of ``block_k`` columns. Each
query block visits only the key tiles where the pattern allows at least one pair, so a causal
pattern does about half the work of the square and a sliding window work proportional to its band.
Element masks are applied only to tiles where the pattern is partial. Tiles are small enough to stay
in cache; extra memory is ``O(block_q * block_k)`` per (batch, head) for the scores plus the
``O(Nq)`` softmax statistics: no ``Nq x Nk`` tensor is ever allocated, forward or backward.

The backward pass is written by hand in the FlashAttention style: it recomputes each tile's
probabilities from the saved log-sum-exp instead of storing them, and it also propagates a gradient
that arrives through the returned LSE (needed when partial results are merged, as ring attention
does).

Positions default to bottom-right alignment; ``positions=(q_pos, k_pos)`` replaces them with
explicit absolute positions (any int64 vectors), so a block of a larger problem, such as one
(query shard, key shard) step of ring attention, sees the pattern at its true global positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..patterns import Pattern, query_key_positions, shared_band
from .common import LOG2E, compute_dtype, kv_groups
from .score_mods import ScoreMod

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512

Positions = tuple[torch.Tensor, torch.Tensor]
"""``(q_pos, k_pos)``: absolute int64 positions of the query rows and key columns."""


@dataclass(frozen=True)
class QueryBlock:
    """Query rows ``[q_start, q_stop)`` and the key tiles they must visit.

    ``tiles`` holds ``(k_start, k_stop, masked)``: keys ``[k_start, k_stop)``, and whether the
    pattern is partial on that tile (an element mask is applied) or allows all of it.
    """

    q_start: int
    q_stop: int
    tiles: tuple[tuple[int, int, bool], ...]


def _positions(positions: Optional[Positions], n_q: int, n_k: int, device) -> Positions:
    if positions is None:
        return query_key_positions(n_q, n_k, device)
    q_pos, k_pos = positions
    if q_pos.is_floating_point() or q_pos.is_complex() or k_pos.is_floating_point() or k_pos.is_complex():
        raise TypeError(f"positions must be integer tensors, got {q_pos.dtype} and {k_pos.dtype}")
    if q_pos.shape != (n_q,) or k_pos.shape != (n_k,):
        raise ValueError(
            f"positions must be vectors of {n_q} query and {n_k} key positions, "
            f"got shapes {tuple(q_pos.shape)} and {tuple(k_pos.shape)}"
        )
    return q_pos.to(device), k_pos.to(device)


def _tile_extremes(pos: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``size`` consecutive entries: the smallest and largest position."""
    pad = -len(pos) % size
    tiles = torch.cat([pos, pos[-1:].expand(pad)]).view(-1, size)
    return tiles.amin(-1), tiles.amax(-1)


def plan_tiles(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    positions: Optional[Positions] = None,
) -> list[QueryBlock]:
    """The work of the blockwise kernel: for each block of query rows, the key tiles that hold at
    least one allowed pair. Tiles with no allowed pair are left out; query blocks that see no key
    at all are left out too (their rows give zeros and LSE -inf).

    Band patterns (Full, Causal, SlidingWindow) are planned in closed form; other patterns
    evaluate their predicate one query block at a time (``block_q x n_k`` booleans at most).
    ``positions`` is ``(q_pos[n_q], k_pos[n_k])``, default bottom-right alignment. Plans for the
    default positions are cached (``auto`` plans before the kernel does, and every layer of a
    model plans the same problem).
    """
    if positions is None and _hashable(pattern):
        return list(_default_plan(pattern, n_q, n_k, block_q, block_k))
    return _plan(pattern, n_q, n_k, block_q, block_k, positions)


def _hashable(pattern: Pattern) -> bool:
    try:
        hash(pattern)
    except TypeError:  # a user's pattern class without __hash__ is planned every time
        return False
    return True


@functools.lru_cache(maxsize=16)
def _default_plan(pattern: Pattern, n_q: int, n_k: int, block_q: int, block_k: int) -> tuple[QueryBlock, ...]:
    return tuple(_plan(pattern, n_q, n_k, block_q, block_k, None))


def _plan(pattern, n_q, n_k, block_q, block_k, positions) -> list[QueryBlock]:
    band = shared_band(pattern)
    q_pos, k_pos = (p.cpu() for p in _positions(positions, n_q, n_k, None))
    k_starts = torch.arange(0, n_k, block_k)
    k_stops = (k_starts + block_k).clamp(max=n_k)
    k_min, k_max = _tile_extremes(k_pos, block_k)
    q_min, q_max = _tile_extremes(q_pos, block_q)
    blocks = []
    for q_start in range(0, n_q, block_q):
        q_stop = min(q_start + block_q, n_q)
        if band is not None:
            lo, hi = band
            # i - j over the tile spans [min(i) - max(j), max(i) - min(j)].
            d_min = q_min[q_start // block_q] - k_max
            d_max = q_max[q_start // block_q] - k_min
            nonempty = (d_max >= lo) & (d_min <= hi)
            full = (d_min >= lo) & (d_max <= hi)
        else:
            allowed = pattern.rows_mask(q_pos[q_start:q_stop], k_pos)  # (..., rows, n_k)
            allowed = allowed.reshape(-1, n_k)
            pad = len(k_starts) * block_k - n_k
            per_tile = F.pad(allowed, (0, pad)).unflatten(-1, (len(k_starts), block_k))
            allowed_per_tile = per_tile.sum(-1)  # (heads or 1, n_tiles)
            nonempty = (allowed_per_tile > 0).any(0)
            full = (allowed_per_tile == k_stops - k_starts).all(0)
        tiles = tuple(
            (int(k_starts[t]), int(k_stops[t]), not bool(full[t]))
            for t in nonempty.nonzero().flatten().tolist()
        )
        if tiles:
            blocks.append(QueryBlock(q_start, q_stop, tiles))
    return blocks


def tile_pairs(blocks: list[QueryBlock]) -> int:
    """How many (query, key) score entries a tile plan of :func:`plan_tiles` computes per (batch, head)."""
    return sum((b.q_stop - b.q_start) * sum(stop - start for start, stop, _ in b.tiles) for b in blocks)


def _tile_scores(q_block, k, block, k_start, k_stop, masked, pattern, positions, padding, score_mod=None):
    """``(scores, raw)`` of one tile: the masked (and modified by ``score_mod``) scaled scores
    ``(B, Hkv, g, rows, cols)`` in the compute dtype, in base-2 units, and the raw ones before
    the modification (None without one). ``padding`` is the ``(B, Nk)`` key padding mask (True =
    a real key) or None; the plan does not know it, so it is applied to every tile."""
    k_tile = k[:, :, k_start:k_stop].unsqueeze(2)  # (B, Hkv, 1, T, D)
    scores = raw = torch.matmul(q_block, k_tile.transpose(-1, -2))
    q_pos, k_pos = positions
    if score_mod is not None:  # before the mask: a hidden pair stays hidden (softcap(-inf) = -cap)
        scores = score_mod.scores(raw, q_pos[block.q_start : block.q_stop], k_pos[k_start:k_stop], LOG2E)
    else:
        raw = None
    if masked:
        allowed = pattern.rows_mask(q_pos[block.q_start : block.q_stop], k_pos[k_start:k_stop])
        if pattern.n_heads is not None:  # (Hq, rows, cols) -> (Hkv, g, rows, cols)
            allowed = allowed.unflatten(0, q_block.shape[1:3])
        scores.masked_fill_(~allowed, float("-inf"))
    if padding is not None:
        scores.masked_fill_(~padding[:, None, None, None, k_start:k_stop], float("-inf"))
    return scores, raw


def _forward(q, k, v, pattern, scale, blocks, positions, padding, score_mod=None):
    # Half inputs are upcast once: scores, softmax statistics and sums are all float32.
    dtype = compute_dtype(q.dtype)
    groups, out_dtype = kv_groups(q, k), q.dtype
    q, k, v = (t.to(dtype) for t in (q, k, v))
    # Scores in base-2 units (scaled by log2(e)): exp2 is several times faster than exp on CPU;
    # the returned LSE is converted back to natural log.
    q_scaled = (q * (scale * LOG2E)).unflatten(1, (k.shape[1], groups))  # (B, Hkv, g, Nq, D)
    out = torch.zeros(*q_scaled.shape[:-1], v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.full(q_scaled.shape[:-1], float("-inf"), dtype=dtype, device=q.device)
    for block in blocks:
        rows = slice(block.q_start, block.q_stop)
        q_block = q_scaled[..., rows, :]
        acc = row_max = row_sum = None
        for k_start, k_stop, masked in block.tiles:
            probs, _ = _tile_scores(q_block, k, block, k_start, k_stop, masked, pattern, positions, padding,
                                    score_mod)
            tile_max = probs.amax(-1)
            new_max = tile_max if row_max is None else torch.maximum(row_max, tile_max)
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)
            probs.sub_(shift.unsqueeze(-1)).exp2_()
            v_tile = v[:, :, k_start:k_stop].unsqueeze(2)
            values = torch.matmul(probs, v_tile)
            if acc is None:
                acc, row_sum = values, probs.sum(-1)
            else:
                correction = torch.exp2(row_max - shift)
                row_sum = row_sum.mul_(correction).add_(probs.sum(-1))
                acc = acc.mul_(correction.unsqueeze(-1)).add_(values)
            row_max = new_max
        seen = row_sum > 0
        out[..., rows, :] = acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1)
        log2_sum = row_max + torch.log2(torch.where(seen, row_sum, 1.0))
        lse[..., rows] = torch.where(seen, log2_sum / LOG2E, float("-inf"))
    return out.flatten(1, 2).to(out_dtype), lse.flatten(1, 2)


def _backward(q, k, v, out, lse, d_out, d_lse, pattern, scale, blocks, positions, padding, score_mod=None):
    """``(dq, dk, dv, d_parameter)``: the score mod's parameter gradient is None when it has none."""
    dtype = compute_dtype(q.dtype)
    groups = kv_groups(q, k)
    grad_dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v, out, d_out = (t.to(dtype) for t in (q, k, v, out, d_out))
    q_scaled = (q * (scale * LOG2E)).unflatten(1, (k.shape[1], groups))
    d_out_g = d_out.unflatten(1, (k.shape[1], groups))
    # delta_i = sum_j p_ij dP_ij = rowsum(dO * O); a gradient on the LSE enters as -dLSE.
    delta = (d_out * out).sum(-1) - d_lse.to(dtype)
    delta = delta.unflatten(1, (k.shape[1], groups))
    lse_g = (lse.to(dtype) * LOG2E).unflatten(1, (k.shape[1], groups))
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), 0.0)  # such rows are fully masked: p = 0
    d_q = torch.zeros(q_scaled.shape, dtype=dtype, device=q.device)
    d_k = torch.zeros(k.shape, dtype=dtype, device=q.device)
    d_v = torch.zeros(v.shape, dtype=dtype, device=q.device)
    d_parameter = None
    for block in blocks:
        rows = slice(block.q_start, block.q_stop)
        q_block, d_out_block = q_scaled[..., rows, :], d_out_g[..., rows, :]
        d_q_block = d_q[..., rows, :]
        for k_start, k_stop, masked in block.tiles:
            cols = slice(k_start, k_stop)
            probs, raw = _tile_scores(q_block, k, block, k_start, k_stop, masked, pattern, positions, padding,
                                      score_mod)
            probs.sub_(lse_g[..., rows].unsqueeze(-1)).exp2_()
            d_v[:, :, cols] += torch.matmul(probs.transpose(-1, -2), d_out_block).sum(2)
            d_scores = torch.matmul(d_out_block, v[:, :, cols].unsqueeze(2).transpose(-1, -2))
            d_scores.sub_(delta[..., rows].unsqueeze(-1)).mul_(probs)
            if score_mod is not None:
                d_scores, d_tile = score_mod.backward(raw, d_scores, positions[0][rows], positions[1][cols], LOG2E)
                if d_tile is not None:
                    d_parameter = d_tile if d_parameter is None else d_parameter.add_(d_tile)
            d_q_block += torch.matmul(d_scores, k[:, :, cols].unsqueeze(2))
            d_k[:, :, cols] += torch.matmul(d_scores.transpose(-1, -2), q_block).sum(2)
    d_q = (d_q * scale).flatten(1, 2)
    d_k = d_k / LOG2E  # d_k was accumulated against q * scale * log2(e)
    if score_mod is not None and score_mod.parameter is not None:
        if d_parameter is None:  # no tile: nothing depends on the parameter
            d_parameter = torch.zeros_like(score_mod.parameter)
        d_parameter = d_parameter.to(score_mod.parameter.dtype)
    return (*(g.to(t) for g, t in zip((d_q, d_k, d_v), grad_dtypes)), d_parameter)


class _BlockwiseAttention(torch.autograd.Function):
    """Inputs ``(q, k, v, parameter, ...)``: ``parameter`` is the score mod's (slopes or table,
    or None), passed apart so that autograd returns its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, parameter, pattern, scale, blocks, positions, padding, score_mod):
        out, lse = _forward(q, k, v, pattern, scale, blocks, positions, padding, score_mod)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pattern, ctx.scale, ctx.blocks, ctx.positions = pattern, scale, blocks, positions
        ctx.padding, ctx.score_mod = padding, score_mod
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        d_q, d_k, d_v, d_parameter = _backward(
            q, k, v, out, lse, d_out, d_lse, ctx.pattern, ctx.scale, ctx.blocks, ctx.positions,
            ctx.padding, ctx.score_mod,
        )
        return d_q, d_k, d_v, d_parameter, None, None, None, None, None, None


def blockwise_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    positions: Optional[Positions] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    blocks: Optional[list[QueryBlock]] = None,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention by KV tiles. Inputs validated: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``,
    v ``(B, Hkv, Nk, Dv)``. Returns ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``; lse is float32 for
    float16/bfloat16 inputs. Differentiable in q, k, v, through out and through lse.
    ``positions = (q_pos (Nq,), k_pos (Nk,))`` sets the absolute positions the pattern sees
    (default: bottom-right alignment). ``key_padding_mask (B, Nk)`` bool, True = a real key, hides
    the padded keys of each batch entry (validated by the caller); rows left with no key give zeros
    and LSE -inf. ``blocks`` is this problem's :func:`plan_tiles` when the caller already made it.
    ``score_mod`` (:mod:`.score_mods`, not a callable) modifies the scores at their absolute
    positions before masking; its parameter gets a gradient when it requires one.
    """
    if blocks is None:
        blocks = plan_tiles(pattern, q.shape[2], k.shape[2], block_q, block_k, positions)
    positions = _positions(positions, q.shape[2], k.shape[2], q.device)
    parameter = None if score_mod is None else score_mod.parameter
    return _BlockwiseAttention.apply(q, k, v, parameter, pattern, scale, blocks, positions, key_padding_mask, score_mod)


def blockwise_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    d_lse: torch.Tensor,
    pattern: Pattern,
    scale: float,
    positions: Positions,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    key_padding_mask: Optional[torch.Tensor] = None,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The share of ``(dq, dk, dv)`` that flows through the keys ``k``/``v`` when they are one
    part of a larger key set: ``out (B, Hq, Nq, Dv)`` and ``lse (B, Hq, Nq)`` are the results over
    the whole key set, ``d_out``/``d_lse`` their gradients. Probabilities are recomputed from
    ``lse`` (FlashAttention's backward for one block); summing the parts gives the exact gradient.
    ``key_padding_mask (B, Nk)`` and ``score_mod``: as for :func:`blockwise_kernel`.
    Returns ``dq (B, Hq, Nq, D)``, ``dk (B, Hkv, Nk, D)``, ``dv (B, Hkv, Nk, Dv)`` and the score
    mod's parameter gradient (None when it has none).
    """
    positions = _positions(positions, q.shape[2], k.shape[2], q.device)
    blocks = plan_tiles(pattern, q.shape[2], k.shape[2], block_q, block_k, positions)
    return _backward(q, k, v, out, lse, d_out, d_lse, pattern, scale, blocks, positions, key_padding_mask, score_mod)


__all__ = ["Positions", "QueryBlock", "blockwise_grads", "blockwise_kernel", "plan_tiles", "tile_pairs"]
