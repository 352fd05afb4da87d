"""Block lists for the block-list Triton kernels, built on the device and cached by the pattern's value.

The FlexAttention ``BlockMask`` idea, exact: for every block of ``blk`` query rows, the blocks of
``blk`` keys that hold an allowed pair, split into *full* blocks (every pair allowed: no element
mask) and *partial* ones, whose element mask is one of a small table of distinct ``blk x blk``
masks; and the same lists transposed (per key block) for the dK/dV pass.

Building: a superset of the non-empty blocks comes from the pattern's structure (a ``BlockSparse``
layout pooled onto the kernel's blocks, a band's closed form, unions and intersections from their
sides, every block otherwise); the pattern's predicate is then evaluated on those blocks only, a
chunk of blocks at a time, on the tensors' device, and the lists are assembled with sorts and
scatters (no Python loop over blocks).

Caching: by the pattern's *value* (:func:`structural_key`), so a pattern rebuilt at every step
(a new ``SlidingWindow(256) | Strided(128)``, a ``BlockSparse`` from the same layout) finds its
lists again; a ``Predicate`` is keyed by its function's identity (two lambdas are never known to
be equal).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch

from ..patterns import BlockSparse, Document, Intersection, Pattern, Union
from ..patterns.document_bounds import document_ids

_EVAL_PAIRS = 1 << 22  # predicate evaluations at once while classifying blocks
_CACHED = 16  # block lists kept (least recently used dropped first)
_cache: OrderedDict = OrderedDict()


@dataclass(frozen=True, eq=False)
class Lists:
    """One direction of a :class:`BlockList`: per owner block (query block, or key block for the
    transposed lists) its full blocks ``full (n, max_full)`` with ``full_count (n,)`` and its
    partial blocks ``partial (n, max_partial)`` with their mask ids ``mask`` and ``partial_count``
    (int32; entries past a count are padding)."""

    full: torch.Tensor
    full_count: torch.Tensor
    partial: torch.Tensor
    mask: torch.Tensor
    partial_count: torch.Tensor


@dataclass(frozen=True, eq=False)
class BlockList:
    """Block lists of one pattern for an ``n_q x n_k`` problem cut into ``blk`` blocks: ``by_query``
    (the forward and dQ passes), ``by_key`` (dK/dV), and ``masks (n_masks, blk, blk)`` int8
    (``[query, key]``, nonzero = allowed; at least one row)."""

    blk: int
    by_query: Lists
    by_key: Lists
    masks: torch.Tensor


def structural_key(value: object) -> Hashable:
    """A hashable key equal for patterns equal by value: the class and the field values (dataclass
    fields, recursively), tensors by shape, dtype and a hash of their contents, callables (a
    ``Predicate``'s function) by identity."""
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
        return ("tensor", tuple(data.shape), str(data.dtype), digest)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, structural_key(getattr(value, f.name))) for f in dataclasses.fields(value))
        return (type(value).__module__, type(value).__qualname__, fields)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(structural_key(v) for v in value))
    return value


def _touch(n_blocks: int, blk: int, start: int, n: int, size: int, n_target: int, device: torch.device) -> torch.Tensor:
    """``(n_blocks, n_target)`` float: 1 where kernel block ``b`` (rows ``[0, n)`` at positions
    ``start + row``) touches the ``size``-block ``t`` of absolute positions."""
    pos = start + torch.arange(n, device=device)
    owner = torch.arange(n, device=device) // blk
    real = pos >= 0
    touched = torch.zeros(n_blocks, n_target, device=device)
    touched[owner[real], (pos[real] // size).clamp(max=n_target - 1)] = 1.0
    return touched


def _candidates(pattern: Pattern, n_q: int, n_k: int, blk: int, device: torch.device) -> torch.Tensor:
    """``(nqb, nkb)`` bool, True where a kernel block may hold an allowed pair (a superset is fine:
    every candidate is classified exactly afterwards)."""
    nqb, nkb = -(-n_q // blk), -(-n_k // blk)
    if isinstance(pattern, BlockSparse):
        rows = _touch(nqb, blk, n_k - n_q, n_q, pattern.block_size, pattern.n_blocks, device)
        cols = _touch(nkb, blk, 0, n_k, pattern.block_size, pattern.n_blocks, device)
        return (rows @ pattern.layout.to(device, torch.float32) @ cols.T) > 0
    if isinstance(pattern, Union):
        return _candidates(pattern.left, n_q, n_k, blk, device) | _candidates(pattern.right, n_q, n_k, blk, device)
    if isinstance(pattern, Intersection):
        return _candidates(pattern.left, n_q, n_k, blk, device) & _candidates(pattern.right, n_q, n_k, blk, device)
    if pattern.band() is not None:
        return pattern.block_layout(n_q, n_k, blk).to(device)
    if isinstance(pattern, Document):
        return _document_candidates(pattern, n_q, n_k, blk, device)
    return torch.ones(nqb, nkb, dtype=torch.bool, device=device)


def _document_candidates(pattern: Document, n_q: int, n_k: int, blk: int, device: torch.device) -> torch.Tensor:
    """Blocks whose query and key positions share a document: the ranges of document ids of the
    two blocks overlap (positions are sorted, so each block's ids are a range)."""
    def id_ranges(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(first, first + count, blk, device=device)
        ends = (starts + blk).clamp(max=first + count) - 1
        return document_ids(pattern.bounds, starts, -1), document_ids(pattern.bounds, ends, -1)

    q_lo, q_hi = id_ranges(n_k - n_q, n_q)
    k_lo, k_hi = id_ranges(0, n_k)
    return (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])


def _classify(pattern: Pattern, qb: torch.Tensor, kb: torch.Tensor, n_q: int, n_k: int, blk: int):
    """For candidate blocks ``(qb, kb)``: which are non-empty, which full, and the element masks
    ``(P, blk * blk)`` of the partial ones. Query rows past ``n_q`` count as allowed (their results
    are never stored); key columns past ``n_k`` as not allowed."""
    local = torch.arange(blk, device=qb.device)
    offset = n_k - n_q
    step = max(1, _EVAL_PAIRS // (blk * blk))
    nonempty, full, partial_masks = [], [], []
    for start in range(0, len(qb), step):
        rows = qb[start : start + step, None] * blk + local  # (P, blk)
        cols = kb[start : start + step, None] * blk + local
        ok = pattern.allows((rows + offset).clamp(max=n_k - 1)[:, :, None], cols.clamp(max=n_k - 1)[:, None, :])
        ok = ok & (cols < n_k)[:, None, :]
        pad = (rows >= n_q)[:, :, None]
        seen = (ok & ~pad).flatten(1).any(1)
        whole = (ok | pad).flatten(1).all(1)
        nonempty.append(seen)
        full.append(seen & whole)
        partial_masks.append(ok[seen & ~whole].flatten(1))
    if not nonempty:
        empty = torch.zeros(0, dtype=torch.bool, device=qb.device)
        return empty, empty, torch.zeros(0, blk * blk, dtype=torch.bool, device=qb.device)
    return torch.cat(nonempty), torch.cat(full), torch.cat(partial_masks)


def _lists(owner: torch.Tensor, other: torch.Tensor, n_owner: int, n_other: int, mask: torch.Tensor) -> tuple:
    """Per owner block, the ``other`` blocks it pairs with (in increasing order) and their ``mask``
    ids: ``(index (n_owner, width), count (n_owner,), mask_ids (n_owner, width))`` int32."""
    order = torch.argsort(owner * n_other + other)
    owner, other, mask = owner[order], other[order], mask[order]
    count = torch.bincount(owner, minlength=n_owner)
    position = torch.arange(len(owner), device=owner.device) - (torch.cumsum(count, 0) - count)[owner]
    width = max(1, int(count.max())) if len(owner) else 1
    index = torch.zeros(n_owner, width, dtype=torch.int32, device=owner.device)
    ids = torch.full((n_owner, width), -1, dtype=torch.int32, device=owner.device)
    index[owner, position] = other.to(torch.int32)
    ids[owner, position] = mask.to(torch.int32)
    return index, count.to(torch.int32), ids


def _side(owner, other, n_owner, n_other, full, mask_id) -> Lists:
    full_index, full_count, _ = _lists(owner[full], other[full], n_owner, n_other, mask_id[full])
    partial_index, partial_count, ids = _lists(owner[~full], other[~full], n_owner, n_other, mask_id[~full])
    return Lists(full_index, full_count, partial_index, ids, partial_count)


def build_block_list(pattern: Pattern, n_q: int, n_k: int, blk: int, device: torch.device) -> BlockList:
    """The block lists of ``pattern`` (no head dimension) for an ``n_q x n_k`` call, on ``device``."""
    nqb, nkb = -(-n_q // blk), -(-n_k // blk)
    qb, kb = _candidates(pattern, n_q, n_k, blk, device).nonzero(as_tuple=True)
    nonempty, full, partial_masks = _classify(pattern, qb, kb, n_q, n_k, blk)
    qb, kb, full = qb[nonempty], kb[nonempty], full[nonempty]
    mask_id = torch.full((len(qb),), -1, dtype=torch.long, device=device)
    masks = torch.zeros(1, blk, blk, dtype=torch.int8, device=device)
    if len(partial_masks):
        table, inverse = torch.unique(partial_masks, dim=0, return_inverse=True)
        mask_id[~full] = inverse
        masks = table.view(-1, blk, blk).to(torch.int8)
    by_query = _side(qb, kb, nqb, nkb, full, mask_id)
    by_key = _side(kb, qb, nkb, nqb, full, mask_id)
    return BlockList(blk, by_query, by_key, masks)


def block_list(pattern: Pattern, n_q: int, n_k: int, blk: int, device: torch.device) -> BlockList:
    """:func:`build_block_list`, cached by the pattern's value (:func:`structural_key`), the sizes
    and the device; the :data:`_CACHED` most recently used are kept."""
    key = (structural_key(pattern), n_q, n_k, blk, str(device))
    found = _cache.get(key)
    if found is None:
        found = build_block_list(pattern, n_q, n_k, blk, device)
        _cache[key] = found
        if len(_cache) > _CACHED:
            _cache.popitem(last=False)
    _cache.move_to_end(key)
    return found
