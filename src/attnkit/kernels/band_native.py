"""Band attention by the native CPU kernel ``csrc/band_attention.c``, forward and backward.

For a band pattern (``lo <= i - j <= hi``: sliding windows and their compositions) the kernel walks
blocks of 8 query rows, each over exactly the keys its rows reach, with register-blocked products
and an exp2 softmax in float32; its backward pass is FlashAttention's (recompute the probabilities
from the LSE; dK and dV summed in a fixed order). Work and memory follow the band: the largest
buffers are the inputs, the outputs and per-thread scratch of a few hundred keys.

:func:`band_native_supports` says when it applies: float32 CPU tensors, equal key and value widths
that are multiples of 16, and a built library (see :mod:`~attnkit.kernels.native`). The sparse
backend calls it for band patterns and falls back to its own plan otherwise.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from .common import kv_groups
from .native import load_native

_LANES = 16
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_SIZES = [_INT64] * 7 + [ctypes.c_float, ctypes.c_int]  # bh, nq, nk, d, lo, hi, groups; scale, threads
_ERRORS = {1: "head dimension is not a positive multiple of 16", 2: "could not allocate scratch memory"}


def _library() -> Optional[ctypes.CDLL]:
    library = load_native("band_attention").library
    if library is not None and not hasattr(library, "_attnkit_typed"):
        library.band_attention_forward.argtypes = [_POINTER] * 5 + _SIZES
        library.band_attention_backward.argtypes = [_POINTER] * 9 + _SIZES
        library._attnkit_typed = True
    return library


def band_native_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native kernel can run these inputs (it builds the library on first call)."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v))
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and q.shape[-1] % _LANES == 0
        and _library() is not None
    )


def _sizes(q: torch.Tensor, k: torch.Tensor, band: tuple[float, float], scale: float) -> list:
    batch, n_q_heads, n_q, dim = q.shape
    n_k = k.shape[2]
    # Outside [1 - n_q, n_k - 1] no offset i - j occurs: clamping keeps the band's meaning (an
    # empty band stays empty) and the values inside int64.
    lo, hi = (int(min(max(edge, -n_q - 1), n_k + 1)) for edge in band)
    return [batch * n_q_heads, n_q, n_k, dim, lo, hi, kv_groups(q, k), scale, torch.get_num_threads()]


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"native band attention: {_ERRORS.get(status, f'status {status}')}")


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, band, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32)
        _check(_library().band_attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *_sizes(q, k, band, scale)
        ))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band, ctx.scale = band, scale
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        delta = (d_out * out).sum(-1)  # the row term of dS = P (dP - delta), less the LSE's gradient
        if d_lse is not None:
            delta = delta - torch.where(torch.isfinite(lse), d_lse, 0.0)
        d_q, d_k, d_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        _check(_library().band_attention_backward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(), d_out.data_ptr(), delta.contiguous().data_ptr(),
            d_q.data_ptr(), d_k.data_ptr(), d_v.data_ptr(), *_sizes(q, k, ctx.band, ctx.scale),
        ))
        return d_q, d_k, d_v, None, None


def band_native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: tuple[float, float], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the band ``band[0] <= i - j <= band[1]`` (finite bounds), bottom-right
    aligned: q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)``, float32 on the CPU (see
    :func:`band_native_supports`). Returns ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``; rows with no
    key give zeros and ``-inf``. Differentiable in q, k, v through out and lse.
    """
    if not all(math.isfinite(edge) for edge in band):
        raise ValueError(f"band_native_attention: band must be finite, got {band}")
    return _BandAttention.apply(q, k, v, tuple(band), float(scale))


__all__ = ["band_native_attention", "band_native_supports"]
