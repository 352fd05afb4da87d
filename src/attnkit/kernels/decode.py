"""Attention for a decoding step: a few query rows against a key/value cache, below the dispatch.

:func:`attnkit.attention` validates its arguments, describes the call, lets ``auto`` choose a
backend (with its plan) and finally checks the output for NaN or inf, rerunning the call when one
may have leaked from a hidden key. A decoding step needs none of that: its shapes are the cache's,
known to be valid, and one query row reads every key of its cache once. :func:`decode_attention`
is the whole computation in a handful of tensor operations with fixed shapes and no value read
back to the host, so ``torch.compile`` can fuse it and CUDA graphs can capture it.

The visibility rule of :func:`attnkit.attention` holds: hidden scores are set to ``-inf`` after
the product, and hidden keys (when gradients flow) and values are replaced by zeros before they
are used, so a NaN or inf at a key a row may not see never reaches that row, nor its gradients.
On a CPU outside ``torch.compile``, the one-row case zeroes hidden values only when the product
without that pass is not finite (one value read back per call; see :func:`_one_row_per_head`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..patterns import Pattern
from .common import compute_dtype


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact attention of ``q (B, Hq, Nq, D)`` over a cache ``k (B, Hkv, S, D)``, ``v (B, Hkv, S, Dv)``.

    Args:
        pattern: which keys each query may see, evaluated at the absolute positions below.
        q_positions: ``(Nq,)`` int64 positions of the query rows.
        k_positions: ``(S,)`` int64 positions of the keys; a negative entry marks an empty cache
            slot (:data:`attnkit.nn.kv_cache.EMPTY`), hidden from every row.
        key_padding_mask: optional ``(B, S)`` bool, True = a real key (padding is hidden).
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
    Returns:
        ``(B, Hq, Nq, Dv)`` in q's dtype; rows that see no key give zeros. Scores and softmax
        statistics are float32 for float16/bfloat16 inputs, float64 for float64.

    Made for ``Nq = 1`` and one pattern for every head (any ``Nq`` and per-head patterns are
    exact too; rows that see different keys are then masked per row, which costs
    ``(B, Hkv, Hq / Hkv, Nq, S, D)`` products). The arguments are the caller's contract (the
    layer that owns the cache): shapes and dtypes are not checked here.
    """
    batch, n_heads, n_q, dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    dtype = compute_dtype(q.dtype)
    scale = dim**-0.5 if scale is None else scale
    visible = pattern.rows_mask(q_positions, k_positions.clamp(min=0)) & (k_positions >= 0)
    # -> (B or 1, Hkv or 1, g or 1, Nq, S): query head h reads KV head h // g
    visible = visible.view(1, n_kv, groups, n_q, n_k) if pattern.n_heads is not None else visible.view(1, 1, 1, n_q, n_k)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(batch, 1, 1, 1, n_k)
    if pattern.n_heads is None and n_q == 1:
        return _one_row_per_head(q, k, v, visible, dtype, scale)
    # Rows see different keys: the products are masked per row, (B, Hkv, g, Nq, S, D).
    seen = visible.unsqueeze(-1)
    grouped = q.reshape(batch, n_kv, groups, n_q, 1, dim).to(dtype)
    scores = (grouped * torch.where(seen, k.to(dtype)[:, :, None, None], 0.0)).sum(-1) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), 0.0, top)  # a row that sees nothing: exp(-inf) = 0 below
    weights = (scores - top).exp()
    total = weights.sum(-1, keepdim=True)
    out = (weights.unsqueeze(-1) * torch.where(seen, v.to(dtype)[:, :, None, None], 0.0)).sum(-2)
    out = out / torch.where(total == 0, 1.0, total)  # a row that sees nothing: 0 / 1; NaN stays NaN
    return out.reshape(batch, n_heads, n_q, -1).to(q.dtype)


def _one_row_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                      dtype: torch.dtype, scale: float) -> torch.Tensor:
    """The decoding case: one query row per head, every head of a batch entry seeing the same
    keys (``visible (B or 1, 1, 1, 1, S)``); ``(B, Hq, 1, Dv)`` in q's dtype.

    Two products over the cache and a softmax. A hidden score is set to ``-inf`` after the
    product, which also drops a NaN or inf that a hidden key put there. A row that sees no key
    gets scores of 0 instead (a finite softmax, also in its gradient) and then weights of 0: its
    output is zeros, as :func:`attnkit.attention` gives. Hidden keys are zeroed only when a
    gradient will flow (the gradient of q reads every key).

    Hidden values get a zero weight, but a zero weight times a NaN value is still NaN, so they
    must be zeroed too. On a CPU, outside ``torch.compile`` and autograd, that pass over the
    cache (a masked fill, slower there than the products) is taken only when the product
    without it is not finite; elsewhere (compiled, on a GPU: no value read back) always.
    """
    batch, n_heads, _, dim = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    hidden = ~visible.view(-1, 1, 1, n_k)  # (B or 1, 1, 1, S)
    hidden_slots = hidden.transpose(-1, -2)  # (B or 1, 1, S, 1)
    keys, values = k.to(dtype), v.to(dtype)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad:
        keys = keys.masked_fill(hidden_slots, 0.0)
    grouped = q.reshape(batch, n_kv, n_heads // n_kv, dim).to(dtype)  # query head h reads KV head h // g
    scores = (grouped @ keys.transpose(-1, -2)).mul_(scale).masked_fill_(hidden, float("-inf"))
    sees_nothing = hidden.all(-1, keepdim=True)
    weights = scores.masked_fill_(sees_nothing, 0.0).softmax(-1) * ~sees_nothing  # (B, Hkv, g, S)
    out = None
    if not grad and q.device.type == "cpu" and not torch.compiler.is_compiling():
        out = weights @ values
        if not bool(torch.isfinite(out).all()):
            out = None  # a NaN or inf came in, maybe from a hidden value: recompute without them
    if out is None:
        out = weights @ values.masked_fill(hidden_slots, 0.0)
    return out.reshape(batch, n_heads, 1, -1).to(q.dtype)
