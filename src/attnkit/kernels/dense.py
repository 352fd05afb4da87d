"""Dense attention through torch's ``scaled_dot_product_attention`` (SDPA).

Full and square causal problems run without a mask (SDPA's fused kernels); any other pattern is
turned into a boolean ``(Nq, Nk)`` mask (``(Hq, Nq, Nk)`` per head), so this backend costs the full
square whatever the pattern allows. GQA uses SDPA's ``enable_gqa``: K/V are not repeated.

When the LSE is asked for on CPU, torch's fused CPU kernel (an internal ATen op that returns
``(out, logsumexp)``) is used; that op gives no gradient through its LSE, so a zero-valued
surrogate adds the exact LSE gradient: ``d lse_i / d q_i = scale * (P K)_i`` and
``d lse_i / d k_j = scale * p_ij q_i``, both computed by one more SDPA call that uses K as the values.
Elsewhere (other devices, or a value width that differs from the key width, which that op
rejects) the LSE comes from the blockwise kernel.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..patterns import Pattern
from .blockwise import blockwise_kernel
from .common import head_mask, kv_groups

_CPU_FUSED_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_lse_available(device: torch.device, head_dim: int, value_dim: int) -> bool:
    """Whether this backend gets the LSE from the same fused call as the output (CPU, and value
    width equal to key width); otherwise asking for the LSE costs a second, blockwise pass."""
    return _CPU_FUSED_WITH_LSE is not None and device.type == "cpu" and value_dim == head_dim


def sdpa_mask(
    pattern: Pattern, n_q: int, n_k: int, device: torch.device, scale: float = 1.0
) -> tuple[bool, Optional[torch.Tensor]]:
    """``(is_causal, mask)`` for SDPA: no mask for Full or a square causal problem, else a bool
    mask ``(Nq, Nk)`` or ``(1, Hq, Nq, Nk)`` with True = may attend.

    torch's ``is_causal`` CPU kernel returns NaN for ``scale <= 0``, so such calls get a mask.
    """
    band = pattern.band() if pattern.n_heads is None else None
    if band is not None:
        lo, hi = band
        # i - j ranges over [1 - n_q, n_k - 1] under bottom-right alignment.
        if lo <= 1 - n_q and hi >= n_k - 1:
            return False, None
        if band == (0, math.inf) and n_q == n_k and scale > 0:
            return True, None
    mask = head_mask(pattern, n_q, n_k, device, groups=1)
    return False, mask.reshape(1, -1, n_q, n_k) if pattern.n_heads else mask


def _with_lse_gradient(
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    is_causal: bool,
    mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        return lse
    weighted_keys = F.scaled_dot_product_attention(  # (P @ K), gradient only into K as values
        q.detach(), k.detach(), k, attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    surrogate = scale * (q * weighted_keys).sum(-1).to(lse.dtype)
    return lse + (surrogate - surrogate.detach())


def dense_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float,
    need_lse: bool,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention through SDPA. Inputs validated: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``,
    v ``(B, Hkv, Nk, Dv)``. Returns ``(out, lse or None)``; fully masked rows give zeros and -inf.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    is_causal, mask = sdpa_mask(pattern, n_q, n_k, q.device, scale)
    gqa = kv_groups(q, k) > 1
    if need_lse and fused_lse_available(q.device, q.shape[-1], v.shape[-1]):
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
            additive.masked_fill_(~mask, float("-inf"))
        out, lse = _CPU_FUSED_WITH_LSE(q, k, v, 0.0, is_causal, attn_mask=additive, scale=scale)
        lse = _with_lse_gradient(lse, q, k, is_causal, mask, scale)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
        lse = blockwise_kernel(q, k, v, pattern, scale)[1] if need_lse else None
    if mask is not None:
        row_has_key = mask.any(-1)
        if not bool(row_has_key.all()):
            out = torch.where(row_has_key.unsqueeze(-1), out, 0.0)
            if lse is not None:
                lse = torch.where(row_has_key, lse, float("-inf"))
    return out, lse
