"""Band attention by the native CPU kernel ``csrc/band_attention.c``, forward and backward.

For a band pattern (``lo <= i - j <= hi``: sliding windows and their compositions) the kernel walks
blocks of a few query rows (8 with AVX-512), each over exactly the keys its rows reach, with
register-blocked products sized for the instruction set it was compiled for and an exp2 softmax in
float32; its backward pass is FlashAttention's (recompute the probabilities from the LSE; dK and dV
summed in a fixed order). Work and memory follow the band: the largest buffers are the inputs, the
outputs and per-thread scratch of a few hundred keys.

:func:`band_native_takes` says whether it can run: float32 CPU tensors, equal key and value widths
that are multiples of 16, and a built library (see :mod:`~attnkit.kernels.native_build`). Whether
it *should* run (it is not slower than the planner on this CPU: :mod:`.band_calibration`) is
decided once per call by the sparse backend, which tells the sparse kernel through its
``native_bands`` argument; the kernel then runs windows and the band parts of plans (Strided's
local band) here, and the planner otherwise.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from ..checks import check_inputs
from .native_build import load_native

_LANES = 16
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_SIZES = [_INT64] * 7 + [ctypes.c_float, ctypes.c_int]  # bh, nq, nk, d, lo, hi, groups; scale, threads
_ERRORS = {1: "bad head dimension or head counts", 2: "could not allocate scratch memory"}


def _library() -> Optional[ctypes.CDLL]:
    library = load_native("band_attention").library
    if library is not None and not hasattr(library, "_attnkit_typed"):
        library.band_attention_forward.argtypes = [_POINTER] * 5 + _SIZES
        library.band_attention_backward.argtypes = [_POINTER] * 9 + _SIZES
        library._attnkit_typed = True
    return library


def band_native_takes(device: torch.device, dtype: torch.dtype, head_dim: int, value_dim: int) -> bool:
    """Whether the kernel can run inputs of this device, dtype and key/value widths here (the
    library builds on first call). It says nothing about speed: see :mod:`.band_calibration`."""
    if device.type != "cpu" or dtype != torch.float32 or head_dim != value_dim or head_dim % _LANES:
        return False
    return _library() is not None


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot take these (already shape-checked) inputs, or None."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or t.dtype != torch.float32:
            return f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}"
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] or q.shape[-1] % _LANES:
        return f"q, k and v must share a head dimension that is a multiple of {_LANES}, got " \
               f"{q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}"
    return None


def _sizes(q: torch.Tensor, k: torch.Tensor, band: tuple[float, float], scale: float) -> list:
    """The C arguments after the pointers, for q ``(..., Hq, Nq, D)`` and k ``(..., Hkv, Nk, D)``
    with the leading dimensions flattened or not (heads of one batch entry stay consecutive)."""
    n_q, dim, n_k = q.shape[-2], q.shape[-1], k.shape[-2]
    rows_q, rows_k = q.numel() // (n_q * dim), k.numel() // (n_k * dim)  # callers skip empty inputs
    # Outside [1 - n_q, n_k - 1] no offset i - j occurs: clamping keeps the band's meaning (an
    # empty band stays empty) and the values inside int64.
    lo, hi = (int(min(max(edge, -n_q - 1), n_k + 1)) for edge in (math.ceil(band[0]), math.floor(band[1])))
    return [rows_q, n_q, n_k, dim, lo, hi, rows_q // rows_k, scale, torch.get_num_threads()]


def _check(status: int) -> None:
    if status:
        raise RuntimeError(f"native band attention: {_ERRORS.get(status, f'status {status}')}")


def band_forward(q, k, v, band: tuple[float, float], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's forward pass, no autograd: contiguous q ``(..., Hq, Nq, D)``, k and v
    ``(..., Hkv, Nk, D)`` (checked inputs) -> ``(out like q, lse (..., Hq, Nq))``."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0:  # an empty batch, or no keys: nothing to attend to
        return out.zero_(), lse.fill_(float("-inf"))
    _check(_library().band_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *_sizes(q, k, band, scale)
    ))
    return out, lse


def band_backward(q, k, v, lse, d_out, delta, band: tuple[float, float], scale: float):
    """The kernel's backward pass for contiguous inputs: given the LSE the probabilities are
    normalised by (the final, merged one when this band is one part of a larger pattern) and
    ``delta = rowsum(d_out * out) - d_lse``, returns this band's ``(dq, dk, dv)``."""
    d_q, d_k, d_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return d_q.zero_(), d_k, d_v
    _check(_library().band_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(), d_out.data_ptr(), delta.data_ptr(),
        d_q.data_ptr(), d_k.data_ptr(), d_v.data_ptr(), *_sizes(q, k, band, scale),
    ))
    return d_q, d_k, d_v


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, band, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = band_forward(q, k, v, band, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band, ctx.scale = band, scale
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors  # contiguous; autograd passes zeros for an unused output
        d_out = d_out.contiguous()
        # The row term of dS = P (dP - delta); rows without keys (lse = -inf) get no gradient.
        delta = ((d_out * out).sum(-1) - torch.where(lse == float("-inf"), 0.0, d_lse)).contiguous()
        return (*band_backward(q, k, v, lse, d_out, delta, ctx.band, ctx.scale), None, None)


def band_native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: tuple[float, float], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the band ``band[0] <= i - j <= band[1]`` (finite bounds), bottom-right
    aligned: q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` with ``Hq`` a multiple of ``Hkv``,
    float32 on the CPU, ``D`` a multiple of 16 (see :func:`band_native_takes`). Returns
    ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``; rows with no key give zeros and ``-inf``.
    Differentiable in q, k, v through out and lse. Raises TypeError / ValueError for inputs it
    cannot take (:func:`~attnkit.checks.check_inputs`'s, then its own) and RuntimeError when the
    library is unavailable.
    """
    if len(band) != 2 or not all(math.isfinite(edge) for edge in band):
        raise ValueError(f"band_native_attention: band must be two finite numbers, got {band}")
    try:
        check_inputs(q, k, v)
    except (TypeError, ValueError) as bad:
        raise type(bad)(f"band_native_attention: {bad}") from None
    problem = _unsupported(q, k, v)
    if problem is not None:
        raise ValueError(f"band_native_attention: {problem}")
    if _library() is None:
        reason = load_native("band_attention").message
        raise RuntimeError(f"band_native_attention: the native library is unavailable ({reason})")
    return _BandAttention.apply(q, k, v, tuple(band), float(scale))


__all__ = ["band_backward", "band_forward", "band_native_attention", "band_native_takes"]
