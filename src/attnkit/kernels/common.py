"""Small helpers shared by the kernels: dtypes, GQA grouping, pattern masks shaped for them, the
log-sum-exp merge of results over disjoint key sets, and the NaN/inf visibility rule."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake

from ..patterns import Pattern, shared_band

LOW_PRECISION = (torch.float16, torch.bfloat16)
LOG2E = math.log2(math.e)
"""``log2(e)``: kernels that take exp2 scale scores by it, and divide base-2 LSEs by it."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics stay in float32 for float16/bfloat16; float64 stays float64."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def kv_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per KV head (``Hq // Hkv``); query head ``h`` uses KV head ``h // groups``."""
    return q.shape[1] // k.shape[1]


def head_mask(pattern: Pattern, n_q: int, n_k: int, device: torch.device, groups: int) -> torch.Tensor:
    """The pattern's ``n_q x n_k`` mask shaped to broadcast against grouped scores
    ``(B, Hkv, g, n_q, n_k)``: ``(n_q, n_k)``, or ``(Hkv, g, n_q, n_k)`` for per-head patterns."""
    allowed = pattern.mask(n_q, n_k, device=device)
    if pattern.n_heads is None:
        return allowed
    return allowed.unflatten(0, (pattern.n_heads // groups, groups))


def allowed_mask(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    device: torch.device,
    groups: int,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Which pairs may attend, shaped to broadcast against grouped scores ``(B, Hkv, g, n_q, n_k)``:
    the pattern at ``positions = (q_pos (n_q,), k_pos (n_k,))`` (default bottom-right), and
    with ``key_padding_mask (B, n_k)`` (True = a real key) only the real keys of each batch entry."""
    if positions is None:
        allowed = head_mask(pattern, n_q, n_k, device, groups)
    else:
        allowed = pattern.rows_mask(*positions)
        if pattern.n_heads is not None:
            allowed = allowed.unflatten(0, (pattern.n_heads // groups, groups))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, None, :]
    return allowed


# ---------------------------------------------------------------------------------------------
# The visibility rule: a row's output depends only on the keys and values it may see.
#
# Kernels compute some pairs they then discard (SDPA's P @ V runs over every key, tiles and units
# cover blocks), and 0 * NaN = NaN, so a NaN or inf at a position a row may not see can still
# reach it. Checking the inputs on every call would cost a pass over K and V (as much as a
# decoding step); checking the output costs a pass over ``out`` only, and a result with no
# non-finite number was not poisoned. Only then are the inputs inspected and the call rerun.
# On CUDA that read of ``out`` is a sync: there the rule is kept by tensor operations alone
# (visible_on_device), whose cost every call pays.

_SEEN_ELEMENTS = 1 << 22  # (row, bad key) pairs evaluated at once by rows_seeing
_HALF_EXPONENT = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def merge_lse(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention results over disjoint key sets into the result over their union.

    Args:
        outs: partial outputs, each ``(B, H, Nq, Dv)``.
        lses: their log-sum-exps, each ``(B, H, Nq)``; ``-inf`` marks a row that saw no key.
    Returns:
        ``(out, lse)`` with ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) * out_i``;
        rows that saw no key in any part give zeros and ``-inf``. Differentiable (finite gradients
        on such rows too). ``out`` keeps the dtype of ``outs[0]``; weights are computed in the
        dtype of the LSEs.
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(
            f"merge_lse: outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}"
        )
    lse_stack = torch.stack(list(lses))  # (P, B, H, Nq)
    top = lse_stack.amax(0)
    top = top.masked_fill(top == float("-inf"), 0.0)
    weights = torch.exp(lse_stack - top)
    total = weights.sum(0)
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    weights = (weights / torch.where(seen, total, 1.0)).unsqueeze(-1)
    out = outs[0].to(weights.dtype) * weights[0]  # then accumulated in place: one pass per part
    for weight, part in zip(weights[1:], outs[1:]):
        out.addcmul_(part.to(weights.dtype), weight)
    return out.to(outs[0].dtype), lse


def all_finite(out: torch.Tensor) -> bool:
    """Whether ``out`` holds no NaN or inf.

    On the CPU numpy does it in the calling thread: a torch reduction over a large tensor wakes
    the intra-op thread pool, which on a busy machine costs more than the pass itself. One sum
    (NaN and inf survive it) decides, unless it is not finite (perhaps an overflow of large
    values): then an element-wise check. Half types are read as bits (numpy lacks bfloat16, and
    a float16 sum would overflow): NaN and inf are the values whose exponent bits are all ones.
    """
    out = out.detach()
    if out.device.type != "cpu":
        return bool(torch.isfinite(out.sum(dtype=compute_dtype(out.dtype)))) or bool(torch.isfinite(out).all())
    if out.dtype in _HALF_EXPONENT:
        exponent = _HALF_EXPONENT[out.dtype]
        return not bool(((out.view(torch.int16).numpy() & exponent) == exponent).any())
    values = out.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum())) or bool(np.isfinite(values).all())


def _sees_every_key(pattern: Pattern, n_q: int, n_k: int) -> bool:
    """Whether every row may see every key: the band covers every offset ``i - j`` in
    ``[1 - n_q, n_k - 1]`` (bottom-right alignment)."""
    band = shared_band(pattern)
    return band is not None and band[0] <= 1 - n_q and band[1] >= n_k - 1


def nonfinite_keys(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, Nk)`` bool: key positions whose key or value holds a NaN or inf."""
    return ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))


def rows_seeing(
    pattern: Pattern,
    bad: torch.Tensor,
    n_q_heads: int,
    n_q: int,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """``(B, Hq, Nq)`` bool: query rows that may see at least one key marked in ``bad
    (B, Hkv, Nk)``, at ``positions = (q_pos, k_pos)`` (default bottom-right). Evaluates the
    pattern on the marked columns only (found on the host), a block of rows at a time."""
    cols = bad.flatten(0, 1).any(0).nonzero().flatten()
    return _rows_seeing_columns(pattern, bad, cols, n_q_heads, n_q, positions)


def _rows_seeing_columns(
    pattern: Pattern,
    bad: torch.Tensor,
    cols: torch.Tensor,
    n_q_heads: int,
    n_q: int,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """:func:`rows_seeing` over the key columns ``cols`` (the others marked nowhere)."""
    n_k = bad.shape[-1]
    marked = bad[..., cols].to(torch.float32).repeat_interleave(n_q_heads // bad.shape[1], dim=1)
    marked = marked.unsqueeze(-1)  # (B, Hq, J, 1)
    if positions is None:
        offset = n_k - n_q
        q_pos, k_cols = torch.arange(offset, offset + n_q, device=bad.device), cols
    else:
        q_pos, k_cols = positions[0], positions[1][cols]
    rows = max(1, _SEEN_ELEMENTS // max(1, len(cols)))
    counts = []
    for start in range(0, n_q, rows):
        allowed = pattern.rows_mask(q_pos[start : start + rows], k_cols).to(torch.float32)  # ([Hq,] r, J)
        counts.append(torch.matmul(allowed, marked).squeeze(-1))  # (B, Hq, r)
    return torch.cat(counts, dim=-1) > 0


def rows_seeing_on_device(
    pattern: Pattern,
    bad: torch.Tensor,
    n_q_heads: int,
    n_q: int,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """:func:`rows_seeing` without reading anything on the host (shapes depend on sizes only).

    A band ``lo <= i - j <= hi`` shared by every head (Causal, SlidingWindow) at the default
    positions counts the marked keys of each row's band by prefix sums: ``O(B Hkv Nk)``. Any
    other pattern is evaluated on every key column, a block of rows at a time: ``O(Nq Nk)``
    mask elements (the host path evaluates the marked columns only, but finding them is a sync).
    """
    band = shared_band(pattern) if positions is None else None
    if band is None:
        cols = torch.arange(bad.shape[-1], device=bad.device)
        return _rows_seeing_columns(pattern, bad, cols, n_q_heads, n_q, positions)
    n_k = bad.shape[-1]
    # Row r (position p = r + n_k - n_q) sees keys j in [p - hi, p - lo], clipped to [0, n_k).
    # prefix[m] = marked keys among the first m; infinite bounds clip to the sequence.
    prefix = torch.nn.functional.pad(bad.to(torch.int32).cumsum(-1), (1, 0))  # (B, Hkv, Nk + 1)
    p = torch.arange(n_k - n_q, n_k, device=bad.device)
    span = n_k + n_q  # any bound beyond this clips like an infinite one
    lo, hi = (int(max(-span, min(span, edge))) for edge in band)
    first = (p - hi).clamp(0, n_k)
    stop = torch.maximum((p - lo + 1).clamp(0, n_k), first)
    seen = prefix[..., stop] - prefix[..., first]  # (B, Hkv, Nq)
    return (seen > 0).repeat_interleave(n_q_heads // bad.shape[1], dim=1)


def _host_read_forbidden(q: torch.Tensor) -> bool:
    """Whether reading a tensor's value on the host is impossible now (compiling, graph capture)
    or meaningless (meta and fake tensors carry no values)."""
    if torch.compiler.is_compiling() or q.is_meta or is_fake(q):
        return True
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _differentiated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd will differentiate the call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


def _needs_no_check(q, k, pattern, positions, key_padding_mask) -> bool:
    """Whether the rule holds without a check: no key is hidden from any row, or (compiling,
    capturing, no values) no check can be made."""
    explicit = positions is not None or key_padding_mask is not None
    return (not explicit and _sees_every_key(pattern, q.shape[2], k.shape[2])) or _host_read_forbidden(q)


def sync_free(device: torch.device) -> bool:
    """Whether the rule must be kept without reading a value on the host (CUDA: a read is a
    sync, which stalls the launch queue), by :func:`visible_on_device`."""
    return device.type == "cuda"


def visible(
    run,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple:
    """``run(k, v)`` (a kernel's result: a tuple of None or tensors ``(B, Hq, Nq, ...)``) under
    the visibility rule: :func:`visible_on_device` where a host read is a sync (CUDA), else the
    result checked and, only when it fails, repaired (:func:`keep_visible`)."""
    if sync_free(q.device) and not _needs_no_check(q, k, pattern, positions, key_padding_mask):
        return visible_on_device(run, q, k, v, pattern, positions, key_padding_mask)
    return keep_visible(run(k, v), run, q, k, v, pattern, positions, key_padding_mask)


def visible_on_device(
    run,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple:
    """The visibility rule as a pure tensor function: nothing is read on the host, so on CUDA
    nothing waits for the device (no ``.item()``, ``bool(tensor)``, ``nonzero``).

    K and V go through ``run`` once, with their non-finite entries set to zero (exactly the
    inputs of :func:`keep_visible`'s rerun, so the rows that may see no such entry get the same
    values and gradients). A row that may see a non-finite key is NaN in every entry of the
    result; a row that may see only non-finite values is NaN in ``result[0]`` (out) and keeps
    the others (the LSE and weights do not depend on V). Those rows are constants: they pass no
    gradient back. The host path instead keeps such rows' own values (which may be finite:
    a key whose scores are all -inf), at the price of reading ``out`` on the host.

    Cost, every call (a branch on the data would be a sync): one read of K and V (which keys
    are non-finite), one read and write of each (the zeroed copies), one select over each
    result entry, and :func:`rows_seeing_on_device` (prefix sums for a band; ``O(Nq Nk)`` mask
    elements for other patterns) -- in place of the host path's sum over ``out`` and its sync.
    """
    bad_k, bad_v = (~torch.isfinite(t).all(-1) for t in (k, v))  # (B, Hkv, Nk) each
    if key_padding_mask is not None:  # rows see no padding key, whatever it holds
        bad_k, bad_v = bad_k & key_padding_mask[:, None, :], bad_v & key_padding_mask[:, None, :]
    clean = run(*(torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in (k, v)))
    sees = rows_seeing_on_device(pattern, torch.cat([bad_k, bad_k | bad_v]), q.shape[1], q.shape[2], positions)
    sees_key, sees_any = sees.chunk(2)  # (B, Hq, Nq) each
    merged = []
    for number, entry in enumerate(clean):
        if entry is None:  # an LSE nobody asked for
            merged.append(None)
            continue
        rows = sees_any if number == 0 else sees_key
        merged.append(torch.where(rows.view(*rows.shape, *([1] * (entry.dim() - 3))), float("nan"), entry))
    return tuple(merged)


def keep_visible(
    result: tuple,
    rerun,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple:
    """Enforce the visibility rule on a kernel's ``result``: a tuple whose entries are None or
    tensors ``(B, Hq, Nq, ...)`` (out, lse, weights); ``rerun`` returns the same entries. When ``result[0]`` is not finite and some
    key or value is, ``rerun(k, v)`` computes the result with those entries set to zero, and
    each row takes that clean result unless it may see a non-finite entry; those rows keep
    their own (non-finite) values, detached, so no NaN flows back into other rows' gradients.
    When autograd will differentiate the call, a non-finite ``k`` or ``v`` takes the same path
    even if ``result[0]`` is finite (a key whose scores are -inf poisons the gradients only).
    A pattern that hides no key from any row (Full; Causal for one decoding query) needs no check.
    Nor is it made while ``torch.compile`` traces or a CUDA graph is captured: reading the result
    on the host would break the graph or the capture (those callers get the kernel's result); nor
    for meta or fake tensors, which hold no values. ``positions`` and ``key_padding_mask`` are the
    call's (see :func:`allowed_mask`): a padding key is hidden from every row."""
    if _needs_no_check(q, k, pattern, positions, key_padding_mask):
        return result
    # A non-finite key can leave ``out`` finite (a score of -inf) yet poison the gradients of
    # every row (0 * inf in the backward pass): when autograd will run, K and V are read too.
    poisoned = not all_finite(result[0])
    if not poisoned and _differentiated(q, k, v):
        poisoned = not (all_finite(k) and all_finite(v))
    if not poisoned:
        return result
    bad = nonfinite_keys(k, v)
    if not bool(bad.any()):
        return result
    if key_padding_mask is not None:  # rows see no padding key, whatever it holds
        bad &= key_padding_mask[:, None, :]
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    clean = rerun(torch.where(torch.isfinite(k), k, zero), torch.where(torch.isfinite(v), v, zero))
    sees = rows_seeing(pattern, bad, q.shape[1], q.shape[2], positions)
    merged = []
    for own, fixed in zip(result, clean):
        if own is None or fixed is None:  # an LSE nobody asked for
            merged.append(None)
            continue
        rows = sees.view(*sees.shape, *([1] * (own.dim() - 3)))
        merged.append(torch.where(rows, own.detach(), fixed))
    return tuple(merged)
