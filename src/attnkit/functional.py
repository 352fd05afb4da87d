"""``attention()`` and ``reference_attention()``: validation, backend choice, one call for every pattern.

Conventions (see ARCHITECTURE.md): tensors are ``(batch, heads, seq, head_dim)``; ``q`` has ``Hq``
heads and ``k``/``v`` have ``Hkv`` heads with ``Hq % Hkv == 0`` (query head ``h`` uses KV head
``h // (Hq // Hkv)``); query row ``r`` sits at absolute position ``r + Nk - Nq``; the scale defaults
to ``1 / sqrt(head_dim)``; fully masked query rows return zeros and LSE ``-inf``; softmax statistics
and the LSE are float32 for float16/bfloat16 inputs.

Non-finite inputs follow one rule in every backend: **a row's output depends only on the keys and
values it may see.** A NaN or inf at a position the pattern hides from a row never reaches that
row (nor its gradients); a row that may see one gets whatever its own arithmetic gives (NaN, or
inf) and passes no gradient back.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

from .kernels.band_native import band_native_supports
from .kernels.blockwise import blockwise_kernel, plan_tiles, planned_pairs
from .kernels.common import keep_visible
from .kernels.dense import dense_fits, dense_kernel, fused_lse_available
from .kernels.reference import reference_kernel
from .kernels.sparse import sparse_kernel
from .kernels.sparse import planned_pairs as sparse_planned_pairs
from .kernels.triton_backend import triton_kernel, triton_preferred
from .patterns import Pattern, as_pattern, finite_band, head_runs

BACKENDS = ("auto", "reference", "dense", "blockwise", "sparse", "triton")
"""Accepted values of ``backend``. Every one runs every pattern and is differentiable."""

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SPARSE_ENOUGH = 0.5  # auto prefers blockwise when its tiles cover less than this share of the square


def _check_inputs(q: object, k: object, v: object) -> None:
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
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.shape[0] == k.shape[0] == v.shape[0]:
        raise ValueError(f"batch sizes differ: {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head_dim differ: {shapes}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, heads and seq: {shapes}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}): {shapes}"
        )


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _check_pattern(pattern: Optional[Pattern], n_q_heads: int) -> Pattern:
    pattern = as_pattern(pattern)
    if pattern.n_heads is not None and pattern.n_heads != n_q_heads:
        raise ValueError(
            f"pattern is per-head for {pattern.n_heads} heads, but q has {n_q_heads} heads"
        )
    return pattern


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend  # type: ignore[return-value]


def _sparse_planned(pattern: Pattern, n_q_heads: int) -> bool:
    """Whether every head's pattern has a planned decomposition (see ``Pattern.parts``)."""
    return all(p.parts is not None for _, _, p in head_runs(pattern, n_q_heads, 1))


_NATIVE_MIN_QUERIES = 32


def _finite_bands(pattern: Pattern, n_q_heads: int) -> bool:
    """Whether every head's pattern is a band with finite bounds (the native band kernel's work)."""
    return all(finite_band(p) is not None for _, _, p in head_runs(pattern, n_q_heads, 1))


def _band_pairs(pattern: Pattern, n_q: int, n_k: int, n_q_heads: int) -> int:
    """The allowed pairs of a band pattern, row by row (``lo <= i - j <= hi`` clipped to the keys):
    about what the native band kernel computes. Called for few queries (decoding)."""
    total = 0
    for first, stop, head_pattern in head_runs(pattern, n_q_heads, 1):
        lo, hi = finite_band(head_pattern)
        for i in range(n_k - n_q, n_k):
            total += (stop - first) * max(0, min(i - lo, n_k - 1) - max(i - hi, 0) + 1)
    return total


def choose_backend(
    pattern: Pattern,
    n_q: int,
    n_k: int,
    device: torch.device,
    need_lse: bool,
    n_q_heads: int = 1,
    *,
    head_dim: int = 64,
    value_dim: int = 64,
    native_band: bool = False,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> str:
    """The backend ``"auto"`` runs: the fastest exact plan for this pattern and these sizes.

    Full and causal problems go to SDPA (one fused call). Sliding windows (finite bands) of at least
    32 queries go to the sparse backend whenever its native band kernel takes the inputs
    (``native_band``: float32 on the CPU, see
    :func:`~attnkit.kernels.band_native.band_native_supports`); it beat masked SDPA at every window
    and length measured, up to a window as long as the sequence. With fewer queries (decoding) one
    SDPA call costs less unless the window covers under half of the keys. Otherwise sliding
    windows, the Strided, Fixed and BlockSparse patterns, their parts and unions of these go to the
    sparse planner when its plan computes less than half of the square, else to SDPA with a mask.
    Other patterns go to the blockwise kernel when its tiles skip at least half of the square,
    else to SDPA with a mask.
    A call that needs the LSE where SDPA cannot return it from the same call (off CPU, or a value
    width unlike the key width) goes to the sparse or blockwise kernel, which produce it anyway.
    Dense is never chosen when its mask would not fit in memory (see
    :func:`~attnkit.kernels.dense.dense_fits`; ``dtype`` and ``scale`` are the call's, which size
    that mask): the sparse or blockwise kernel runs instead.
    """
    choice = _fastest(pattern, n_q, n_k, device, need_lse, n_q_heads, head_dim, value_dim, native_band)
    if choice == "dense" and not dense_fits(pattern, n_q, n_k, device, dtype, scale):
        return "sparse" if _sparse_planned(pattern, n_q_heads) else "blockwise"
    return choice


def _fastest(pattern, n_q, n_k, device, need_lse, n_q_heads, head_dim, value_dim, native_band) -> str:
    lse_needs_kernel = need_lse and not fused_lse_available(device, head_dim, value_dim)
    if native_band and _finite_bands(pattern, n_q_heads):
        if n_q >= _NATIVE_MIN_QUERIES or lse_needs_kernel:
            return "sparse"
        allowed = _band_pairs(pattern, n_q, n_k, n_q_heads)
        return "sparse" if allowed < _SPARSE_ENOUGH * n_q * n_k * n_q_heads else "dense"
    if _sparse_planned(pattern, n_q_heads):
        sparse_pairs = sparse_planned_pairs(pattern, n_q, n_k, n_q_heads)
        if lse_needs_kernel or sparse_pairs < _SPARSE_ENOUGH * n_q * n_k * n_q_heads:
            return "sparse"
        return "dense"
    band = pattern.band() if pattern.n_heads is None else None
    if lse_needs_kernel:
        return "blockwise"
    if band is not None and (band[1] == math.inf and band[0] in (0, -math.inf)):
        return "dense"
    covered = planned_pairs(plan_tiles(pattern, n_q, n_k))
    return "blockwise" if covered < _SPARSE_ENOUGH * n_q * n_k else "dense"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact scaled dot-product attention restricted to ``pattern``.

    Args:
        q: ``(B, Hq, Nq, D)`` queries.
        k: ``(B, Hkv, Nk, D)`` keys, ``Hq % Hkv == 0`` (MHA ``Hkv == Hq``, MQA ``Hkv == 1``).
        v: ``(B, Hkv, Nk, Dv)`` values.
        pattern: which keys each query may see; ``None`` means :class:`~attnkit.patterns.Full`.
        scale: multiplier of ``q @ k^T``; default ``1 / sqrt(D)``.
        backend: ``"auto"`` (fastest exact choice), ``"reference"`` (explicit two-step math),
            ``"dense"`` (torch SDPA), ``"blockwise"`` (tiled online softmax, skips empty tiles),
            ``"sparse"`` (the sparse planner: work in proportion to the allowed pairs),
            ``"triton"`` (Triton GPU kernels; CPU tensors under ``TRITON_INTERPRET=1``).
        return_lse: also return the log-sum-exp of the allowed scaled scores.
    Returns:
        ``out (B, Hq, Nq, Dv)`` in q's dtype, or ``(out, lse)`` with lse ``(B, Hq, Nq)`` (float32
        for half inputs, float64 for float64). Fully masked rows give zeros and lse ``-inf``.
    Raises:
        TypeError: a non-tensor or non-float input, mixed dtypes, a non-pattern, a bad scale.
        ValueError: rank not 4, batch/head_dim/seq mismatch, ``Hq % Hkv != 0``, mixed devices,
            a per-head pattern whose head count differs from ``Hq``, an unknown backend,
            ``backend="dense"`` for a pattern whose mask would take more than a quarter of the
            free memory (the message names the backends that run it without one).

    A NaN or inf in a key or value reaches only the rows that may see it (see the module
    docstring); the check costs one sum over ``out`` (plus one over ``k`` and ``v`` when
    autograd will differentiate the call) and reruns the call only when it fails.
    """
    _check_inputs(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    pattern = _check_pattern(pattern, q.shape[1])
    pattern.validate(q.shape[2], k.shape[2])
    backend = _check_backend(backend)
    if backend == "auto" and triton_preferred(q, k, v, pattern):
        backend = "triton"
    if backend == "auto":
        backend = choose_backend(
            pattern, q.shape[2], k.shape[2], q.device, return_lse, q.shape[1],
            head_dim=q.shape[-1], value_dim=v.shape[-1],
            native_band=_finite_bands(pattern, q.shape[1]) and band_native_supports(q, k, v),
            dtype=q.dtype, scale=scale,
        )
    if backend == "reference":
        out, lse, _ = reference_kernel(q, k, v, pattern, scale)
    elif backend == "dense":
        out, lse = dense_kernel(q, k, v, pattern, scale, need_lse=return_lse)
    elif backend == "sparse":
        out, lse = sparse_kernel(q, k, v, pattern, scale)
    elif backend == "triton":
        out, lse = triton_kernel(q, k, v, pattern, scale)
    else:
        out, lse = blockwise_kernel(q, k, v, pattern, scale)

    def rerun(k_clean: torch.Tensor, v_clean: torch.Tensor) -> tuple:
        result = attention(q, k_clean, v_clean, pattern, scale=scale, backend=backend, return_lse=return_lse)
        return result if return_lse else (result, None)

    out, lse = keep_visible((out, lse), rerun, q, k, v, pattern)
    return (out, lse) if return_lse else out


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Optional[Pattern] = None,
    *,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's two steps, explicitly: returns ``(out (B, Hq, Nq, Dv), weights (B, Hq, Nq, Nk))``.

    ``weights`` are the softmax-normalised relevance scores (step 1); ``out = weights @ v``
    (step 2). Half-precision inputs are computed in float32 (weights stay float32, out is cast
    back). Same arguments, conventions and errors as :func:`attention`.
    """
    _check_inputs(q, k, v)
    scale = _check_scale(scale, q.shape[-1])
    pattern = _check_pattern(pattern, q.shape[1])
    pattern.validate(q.shape[2], k.shape[2])
    result = reference_kernel(q, k, v, pattern, scale)
    out, _, weights = keep_visible(result, lambda k_, v_: reference_kernel(q, k_, v_, pattern, scale), q, k, v, pattern)
    return out, weights
