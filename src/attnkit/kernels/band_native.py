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

A score modification (:mod:`.score_mods`: softcap, alibi, distance_bias) is applied by the kernel
itself; its parameter (slopes, table) gets its gradient from the backward pass.
"""

from __future__ import annotations

import ctypes
import math
from typing import Optional

import torch

from ..checks import check_inputs
from .native_build import load_native
from .score_mods import ScoreMod

_LANES = 16
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_SIZES = [_INT64] * 7 + [ctypes.c_float, ctypes.c_int]  # bh, nq, nk, d, lo, hi, groups; scale, threads
_MOD = [ctypes.c_int, ctypes.c_float, _POINTER, _INT64, _INT64]  # mod, cap, bias, heads, bias_cols
_ERRORS = {1: "bad head dimension or head counts", 2: "could not allocate scratch memory"}
_MOD_CODES = {"softcap": 1, "alibi": 2, "distance_bias": 3}
"""The kernel's ``MOD_*`` codes (0: no modification)."""
NATIVE_SCORE_MODS = tuple(_MOD_CODES)


def _library() -> Optional[ctypes.CDLL]:
    library = load_native("band_attention").library
    if library is not None and not hasattr(library, "_attnkit_typed"):
        library.band_attention_forward.argtypes = [_POINTER] * 5 + _SIZES + _MOD
        library.band_attention_backward.argtypes = [_POINTER] * 9 + _SIZES + _MOD + [_POINTER]
        library.band_attention_backward_strips.argtypes = [_INT64] * 4
        library.band_attention_backward_strips.restype = _INT64
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


def mod_arguments(q: torch.Tensor, score_mod: Optional[ScoreMod]) -> tuple[list, Optional[torch.Tensor]]:
    """The kernel's score-modification arguments (``mod, cap, bias, heads, bias_cols``) for q
    ``(B, Hq, Nq, D)``, and the float32 contiguous parameter ``bias`` points to (the caller keeps
    it alive during the call)."""
    if score_mod is None:
        return [0, 0.0, None, 1, 1], None
    if q.dim() != 4:
        raise ValueError(f"a score_mod needs q of shape (B, Hq, Nq, D), got {tuple(q.shape)}")
    parameter = score_mod.parameter
    if parameter is not None:
        parameter = parameter.detach().to(torch.float32).contiguous()
    pointer = None if parameter is None else parameter.data_ptr()
    columns = 1 if parameter is None or parameter.dim() == 1 else parameter.shape[1]
    cap = 0.0 if score_mod.cap is None else score_mod.cap
    return [_MOD_CODES[score_mod.kind], cap, pointer, q.shape[1], columns], parameter


def band_forward(q, k, v, band: tuple[float, float], scale: float,
                 score_mod: Optional[ScoreMod] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's forward pass, no autograd: contiguous q ``(..., Hq, Nq, D)``, k and v
    ``(..., Hkv, Nk, D)`` (checked inputs) -> ``(out like q, lse (..., Hq, Nq))``. With a
    ``score_mod`` (a built-in kind whose parameter has ``Hq`` rows) q must be ``(B, Hq, Nq, D)``."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32)
    if q.numel() == 0 or k.numel() == 0:  # an empty batch, or no keys: nothing to attend to
        return out.zero_(), lse.fill_(float("-inf"))
    mod, _parameter = mod_arguments(q, score_mod)
    _check(_library().band_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), *_sizes(q, k, band, scale), *mod
    ))
    return out, lse


def band_backward(q, k, v, lse, d_out, delta, band: tuple[float, float], scale: float,
                  score_mod: Optional[ScoreMod] = None) -> tuple:
    """The kernel's backward pass for contiguous inputs: given the LSE the probabilities are
    normalised by (the final, merged one when this band is one part of a larger pattern) and
    ``delta = rowsum(d_out * out) - d_lse``, returns this band's ``(dq, dk, dv)``, and with a
    ``score_mod`` that has a parameter (q then ``(B, Hq, Nq, D)``) its gradient share as a fourth
    element (float32, the parameter's shape)."""
    d_q, d_k, d_v = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mod, parameter = mod_arguments(q, score_mod)
    if q.numel() == 0 or k.numel() == 0:
        return (d_q.zero_(), d_k, d_v) + (() if parameter is None else (torch.zeros_like(parameter),))
    sizes = _sizes(q, k, band, scale)
    shares = None
    if parameter is not None:  # one share per (head row, strip), summed here in a fixed order
        strips = _library().band_attention_backward_strips(sizes[1], sizes[2], sizes[4], sizes[5])
        shares = torch.zeros(sizes[0], strips, mod[4] if score_mod.kind == "distance_bias" else 1)
    _check(_library().band_attention_backward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), lse.data_ptr(), d_out.data_ptr(), delta.data_ptr(),
        d_q.data_ptr(), d_k.data_ptr(), d_v.data_ptr(), *sizes, *mod, None if shares is None else shares.data_ptr(),
    ))
    if parameter is None:
        return d_q, d_k, d_v
    d_parameter = shares.view(q.shape[0], q.shape[1], -1, shares.shape[-1]).sum((0, 2))
    return d_q, d_k, d_v, d_parameter.view(parameter.shape)


class _BandAttention(torch.autograd.Function):
    """Inputs ``(q, k, v, parameter, band, scale, score_mod)``: ``parameter`` is the score mod's
    (or None), passed apart so that autograd returns its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, parameter, band, scale, score_mod):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = band_forward(q, k, v, band, scale, score_mod)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.band, ctx.scale, ctx.score_mod = band, scale, score_mod
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse = ctx.saved_tensors  # contiguous; autograd passes zeros for an unused output
        d_out = d_out.contiguous()
        # The row term of dS = P (dP - delta); rows without keys (lse = -inf) get no gradient.
        delta = ((d_out * out).sum(-1) - torch.where(lse == float("-inf"), 0.0, d_lse)).contiguous()
        grads = band_backward(q, k, v, lse, d_out, delta, ctx.band, ctx.scale, ctx.score_mod)
        d_parameter = grads[3].to(ctx.score_mod.parameter.dtype) if len(grads) == 4 else None
        return (*grads[:3], d_parameter, None, None, None)


def band_native_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: tuple[float, float], scale: float,
    score_mod: Optional[ScoreMod] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the band ``band[0] <= i - j <= band[1]`` (finite bounds), bottom-right
    aligned: q ``(B, Hq, Nq, D)``, k and v ``(B, Hkv, Nk, D)`` with ``Hq`` a multiple of ``Hkv``,
    float32 on the CPU, ``D`` a multiple of 16 (see :func:`band_native_takes`). Returns
    ``(out (B, Hq, Nq, D), lse (B, Hq, Nq))``; rows with no key give zeros and ``-inf``.
    Differentiable in q, k, v through out and lse. ``score_mod``: softcap, alibi or
    distance_bias (:mod:`.score_mods`; its parameter ``(Hq, ...)`` is differentiable too),
    applied at the bottom-right positions. Raises TypeError / ValueError for inputs it cannot take
    (:func:`~attnkit.checks.check_inputs`'s, then its own) and RuntimeError when the library is
    unavailable.
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
    if score_mod is not None and score_mod.kind not in _MOD_CODES:
        raise ValueError(f"band_native_attention: it does not apply score_mod {score_mod.kind}")
    parameter = None if score_mod is None else score_mod.parameter
    return _BandAttention.apply(q, k, v, parameter, tuple(band), float(scale), score_mod)


__all__ = ["NATIVE_SCORE_MODS", "band_backward", "band_forward", "band_native_attention", "band_native_takes",
           "mod_arguments"]
