"""Argument checks shared across attnkit, so that every module words its errors the same way."""

from __future__ import annotations

import math
import numbers
import operator

import numpy
import torch


def positive_int(owner: str, name: str, value: object) -> int:
    """Return ``value`` as an int when it is a positive integer (numpy integers included).

    Raises TypeError naming ``owner`` and ``name`` for a non-integer (``bool`` included) and
    ValueError for an integer ``<= 0``.
    """
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}") from None
    if number <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {number}")
    return number


def boolean(owner: str, name: str, value: object) -> bool:
    """Return ``value`` as a bool when it is one (numpy booleans included).

    Raises TypeError naming ``owner`` and ``name`` otherwise: a string such as ``"false"`` or an
    integer is refused rather than read by truthiness.
    """
    if isinstance(value, (bool, numpy.bool_)):
        return bool(value)
    raise TypeError(f"{owner}: {name} must be True or False, got {type(value).__name__} {value!r}")


def finite_real(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a float when it is a finite real number (numpy numbers included, bool not).

    Raises TypeError naming ``owner`` and ``name`` for a non-number, ValueError for NaN or infinity.
    """
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (10**400) is not finite as a float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{owner}: {name} must be finite, got {_short(value)}")
    return number


def _short(value: object) -> str:
    """``repr(value)``, cut short: a huge integer would otherwise fill the whole error."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 60 else f"{text[:57]}..."


def check_token_ids(owner: str, tokens: object, vocab_size: int) -> None:
    """Check a language model's input ``tokens``: an integer tensor ``(batch, seq)`` with ``seq >= 1``
    and ids in ``[0, vocab_size)`` (not read on the meta device). Raises ValueError naming ``owner``."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{owner}: tokens must be an integer tensor (batch, seq), got {got}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{owner}: tokens is empty (seq = 0)")
    if tokens.device.type != "meta" and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{owner}: token ids must lie in [0, {vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )


# ---------------------------------------------------------------------------------------------
# Attention inputs: q, k, v, scale, positions and key padding, worded the same in every caller.

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(q: object, k: object, v: object) -> None:
    """Check ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``: tensors of rank 4
    and one float dtype on one device, with agreeing sizes and ``Hq % Hkv == 0``.

    Raises TypeError (non-tensor, non-float or mixed dtypes) or ValueError (shapes, devices).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if 0 in t.shape[1:]:
            raise ValueError(f"{name} must have heads, seq and head_dim >= 1, got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch sizes differ: {_shapes(q, k, v)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: {_shapes(q, k, v)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, heads and seq: {_shapes(q, k, v)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}): {_shapes(q, k, v)}"
        )


def _shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The three shapes for an error message (built only when one is raised: calls are hot)."""
    return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` as a float (default ``1 / sqrt(head_dim)``); TypeError for a non-number (bool
    included), ValueError for NaN or infinity."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def check_positions(name: str, positions: object, length: int, device: torch.device) -> torch.Tensor:
    """``positions`` as the 1-D integer tensor of ``length`` absolute positions on ``device``.

    Raises TypeError (not a tensor, not an integer dtype) or ValueError (shape, device), naming
    ``name`` (``q_positions`` or ``k_positions``)."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor or None, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"{name} must hold integers (int64), got {positions.dtype}")
    if positions.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(positions.shape)}")
    if positions.device != device:
        raise ValueError(f"{name} must be on {device} like q, k and v, got {positions.device}")
    return positions.long()


def check_key_padding_mask(mask: object, batch: int, n_k: int, device: torch.device) -> torch.Tensor:
    """``mask`` as a ``(batch, n_k)`` bool tensor on ``device`` (True = a real key).

    Raises TypeError (not a bool tensor) or ValueError (shape, device) naming ``key_padding_mask``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = a real key), got {mask.dtype}")
    if mask.shape != (batch, n_k):
        raise ValueError(f"key_padding_mask must have shape (batch, keys) = ({batch}, {n_k}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device} like q, k and v, got {mask.device}")
    return mask


def check_sinks(sinks: object, n_q_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``sinks`` as the ``(n_q_heads,)`` float tensor of per-head sink logits on ``device``.

    Its dtype is the inputs' ``dtype``, or float32 for float16/bfloat16 inputs (the dtype of their
    softmax statistics). Raises TypeError (not a tensor, a wrong dtype) or ValueError (shape,
    device) naming ``sinks``."""
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a 1-D float torch.Tensor of one logit per query head or None, "
                        f"got {type(sinks).__name__}")
    allowed = (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)
    if sinks.dtype not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"sinks must have dtype {names} for {dtype} inputs, got {sinks.dtype}")
    if sinks.shape != (n_q_heads,):
        raise ValueError(f"sinks must have shape (query heads,) = ({n_q_heads},), got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks must be on {device} like q, k and v, got {sinks.device}")
    return sinks
