"""Dense attention through torch's ``scaled_dot_product_attention`` (SDPA).

Full and square causal problems run without a mask (SDPA's fused kernels); any other pattern is
turned into a boolean ``(Nq, Nk)`` mask (``(Hq, Nq, Nk)`` per head), so this backend costs the full
square whatever the pattern allows. GQA uses SDPA's ``enable_gqa``: K/V are not repeated.

When the LSE is asked for on CPU, torch's fused CPU kernel (an internal ATen op that returns
``(out, logsumexp)``) is used; that op gives no gradient through its LSE, so a zero-valued
surrogate adds the exact LSE gradient: ``d lse_i / d q_i = scale * (P K)_i`` and
``d lse_i / d k_j = scale * p_ij q_i``, both computed by one more SDPA call that uses K as the values.
Elsewhere (other devices, or a value width that differs from the key width, which that op
rejects) the LSE comes from the blockwise kernel. That op reads its inputs as if their last
dimension were unit-stride, so views that are not (a transposed or sliced head dimension) are
copied first.

A mask costs ``Nq x Nk`` bytes plus the same number of elements in the inputs' dtype (SDPA, and
the fused op, add a float copy of it). :func:`check_dense_fits` refuses a mask larger than a
quarter of the free memory, naming the backends that run the pattern without one.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..patterns import Pattern, query_key_positions, shared_band
from .blockwise import blockwise_kernel
from .common import allowed_mask, kv_groups
from .score_mods import ScoreMod

_CPU_FUSED_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_lse_available(device: torch.device, head_dim: int, value_dim: int) -> bool:
    """Whether this backend gets the LSE from the same fused call as the output (CPU, and value
    width equal to key width); otherwise asking for the LSE costs a second, blockwise pass."""
    return _CPU_FUSED_WITH_LSE is not None and device.type == "cpu" and value_dim == head_dim


MASK_CHECKED_ABOVE = 1 << 26
"""Bytes of mask below which no free-memory check is made (every machine has this much)."""


def _mask_free(pattern: Pattern, n_q: int, n_k: int, scale: float) -> Optional[bool]:
    """``is_causal`` when SDPA runs this problem without a mask, None when it needs one.

    torch's ``is_causal`` CPU kernel returns NaN for ``scale <= 0``, so such calls get a mask.
    """
    band = shared_band(pattern)
    if band is not None:
        lo, hi = band
        # i - j ranges over [1 - n_q, n_k - 1] under bottom-right alignment.
        if lo <= 1 - n_q and hi >= n_k - 1:
            return False
        if band == (0, math.inf) and n_q == n_k and scale > 0:
            return True
    return None


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes free on ``device`` (CPU: the kernel's ``MemAvailable``, else free pages; CUDA: the
    driver's free memory plus the blocks PyTorch's allocator holds unused), or None when unknown."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def dense_mask_bytes(
    pattern: Pattern, n_q: int, n_k: int, dtype: torch.dtype, scale: float = 1.0, *, explicit: bool = False,
    padded_batch: int = 1,
) -> int:
    """Bytes of the masks this backend builds for the problem: the bool mask and its float copy.
    ``explicit``: the call gives positions or a key padding mask (always a mask); a padding mask
    makes one mask per batch entry (``padded_batch`` of them)."""
    if not explicit and _mask_free(pattern, n_q, n_k, scale) is not None:
        return 0
    masks = (pattern.n_heads or 1) * padded_batch
    return masks * n_q * n_k * (1 + dtype.itemsize)


def free_memory_short(needed: int, device: torch.device) -> Optional[int]:
    """The free bytes of ``device`` when a buffer of ``needed`` bytes would take more than a
    quarter of them, else None (buffers up to :data:`MASK_CHECKED_ABOVE` bytes, and devices whose
    free memory is unknown, are not checked)."""
    if needed <= MASK_CHECKED_ABOVE:
        return None
    free = free_memory(device)
    return None if free is None or needed <= free // 4 else free


def dense_misfit(
    pattern: Pattern, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0, **mask
) -> Optional[str]:
    """None when the dense backend's mask stays within a quarter of the free memory, else a
    sentence saying so and naming the backends that need no mask. ``mask``: the keyword
    arguments of :func:`dense_mask_bytes`."""
    needed = dense_mask_bytes(pattern, n_q, n_k, dtype, scale, **mask)
    free = free_memory_short(needed, device)
    if free is None:
        return None
    return (
        f"backend 'dense' needs a {needed / 2**30:.2f} GiB mask for {pattern!r} with Nq={n_q}, Nk={n_k} "
        f"on {device} (more than a quarter of the {free / 2**30:.2f} GiB free); use backend='sparse' "
        "or backend='blockwise', which never build an Nq x Nk mask"
    )


def check_dense_fits(
    pattern: Pattern, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0, **mask
) -> None:
    """Raise ValueError when the dense backend's mask would exceed a quarter of the free memory."""
    reason = dense_misfit(pattern, n_q, n_k, device, dtype, scale, **mask)
    if reason is not None:
        raise ValueError(reason)


def sdpa_mask(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    device: torch.device,
    scale: float = 1.0,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> tuple[bool, Optional[torch.Tensor]]:
    """``(is_causal, mask)`` for SDPA: no mask for Full or a square causal problem, else a bool
    mask ``(Nq, Nk)``, ``(1, Hq, Nq, Nk)`` or, with a ``key_padding_mask (B, Nk)``,
    ``(B, 1 or Hq, Nq, Nk)``, True = may attend. ``positions = (q_pos, k_pos)`` places the
    pattern at those absolute positions.
    """
    if positions is None and key_padding_mask is None:
        is_causal = _mask_free(pattern, n_q, n_k, scale)
        if is_causal is not None:
            return is_causal, None
    mask = allowed_mask(pattern, n_q, n_k, device, 1, positions, key_padding_mask)
    if key_padding_mask is not None:  # (B, 1 or Hq, 1, Nq, Nk)
        return False, mask.squeeze(2)
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
    *,
    positions: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    memory_checked: bool = False,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention through SDPA. Inputs validated: q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``,
    v ``(B, Hkv, Nk, Dv)``; ``positions = (q_pos (Nq,), k_pos (Nk,))`` (default bottom-right) and
    ``key_padding_mask (B, Nk)`` (True = a real key) shape the mask. Returns ``(out, lse or None)``;
    fully masked rows give zeros and -inf. Raises ValueError when the mask would not fit (see
    :func:`check_dense_fits`; ``memory_checked``: the caller made that check, as the dense backend
    does). Where the fused CPU op cannot give the LSE, the blockwise kernel computes it.
    An additive ``score_mod`` (alibi, distance_bias: ``score_mod.additive``) enters SDPA as a
    float mask ``(1, Hq, Nq, Nk)`` (SDPA differentiates it, so its parameter gets a gradient);
    the LSE then comes from the blockwise kernel.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    if not memory_checked:
        check_dense_fits(pattern, n_q, n_k, q.device, q.dtype, scale, explicit=positions is not None or
                         key_padding_mask is not None, padded_batch=1 if key_padding_mask is None else q.shape[0])
    if score_mod is not None:
        return _biased(q, k, v, pattern, scale, need_lse, positions, key_padding_mask, score_mod)
    is_causal, mask = sdpa_mask(pattern, n_q, n_k, q.device, scale, positions, key_padding_mask)
    gqa = kv_groups(q, k) > 1
    fused_lse = need_lse and fused_lse_available(q.device, q.shape[-1], v.shape[-1])
    row_has_key = None
    if mask is not None:
        row_has_key = mask.any(-1)
        # Reading whether every row sees a key is a host sync off the CPU (and meta tensors hold
        # no values): there the patch is applied unconditionally, a no-op where no row is empty.
        if q.device.type == "cpu" and bool(row_has_key.all()):
            row_has_key = None
        else:
            # A row that may see no key is given key 0, so that SDPA stays finite on every
            # device; it is zeroed below, as every fully masked row in attnkit is.
            mask = mask.clone()
            mask[..., 0] |= ~row_has_key
    if fused_lse:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
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
        lse = None
        if need_lse:
            lse = blockwise_kernel(q, k, v, pattern, scale, positions=positions, key_padding_mask=key_padding_mask)[1]
    if row_has_key is not None:
        out = torch.where(row_has_key.unsqueeze(-1), out, 0.0)
        if lse is not None:
            lse = torch.where(row_has_key, lse, float("-inf"))
    return out, lse


def _biased(q, k, v, pattern, scale, need_lse, positions, key_padding_mask, score_mod):
    """:func:`dense_kernel` with an additive score mod: one float mask, the bias with ``-inf`` on
    hidden pairs; rows without a key are zeroed (the bias stays finite, so SDPA gives NaN there)."""
    n_q, n_k = q.shape[2], k.shape[2]
    q_pos, k_pos = query_key_positions(n_q, n_k, q.device) if positions is None else positions
    bias = score_mod.bias(q_pos, k_pos, q.shape[1], q.dtype).flatten(0, 1).unsqueeze(0)  # (1, Hq, Nq, Nk)
    allowed = allowed_mask(pattern, n_q, n_k, q.device, 1, positions, key_padding_mask)
    allowed = allowed.squeeze(2) if key_padding_mask is not None else allowed.reshape(1, -1, n_q, n_k)
    row_has_key = allowed.any(-1)
    allowed = allowed | ~row_has_key.unsqueeze(-1)  # such rows see every key, then are zeroed
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.masked_fill(~allowed, float("-inf")), scale=scale,
        enable_gqa=kv_groups(q, k) > 1,
    )
    out = torch.where(row_has_key.unsqueeze(-1), out, 0.0)
    lse = None
    if need_lse:
        lse = blockwise_kernel(q, k, v, pattern, scale, positions=positions, key_padding_mask=key_padding_mask,
                               score_mod=score_mod)[1]
    return out, lse
