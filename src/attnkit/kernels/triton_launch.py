"""The ``"triton"`` backend: patterns become Triton kernel launches, forward and backward.

A pattern is split into disjoint *parts* that each run one kernel; results are merged by their
log-sum-exp and the backward pass gives every part the merged LSE, so each contributes exactly its
share of dQ, dK, dV. Parts come from the pattern's own facts (``band()``, ``parts``, the classes
of :mod:`attnkit.patterns`), never from evaluating it on the ``Nq x Nk`` square:

- a band ``lo <= i - j <= hi`` (windows, causal, their intersections): one band part;
- ``Strided(s)``: the band ``0 <= i - j <= s`` and each residue class mod ``s`` as its own
  sequence with ``i // s - j // s >= 2`` (the periodic keys the band does not hold);
- ``Fixed(s, c)``: the causal blocks of ``s`` (segmented band) and the summary columns of the
  earlier blocks (gathered by formula);
- ``Periodic``, ``BlockLocal``, ``Summary`` alone: one part each;
- anything else (``BlockSparse`` layouts, unions, intersections, predicates): the block-list kernel of
  :mod:`~attnkit.kernels.triton_blocks`, which walks a per-query-block list of key blocks.

Decode-sized calls (up to 16 queries) split each query block's keys across programs and merge the
shares by LSE (flash-decoding). Inputs: float16, bfloat16 (the fast path: tensor cores, float32
accumulation) or float32 (IEEE float32 FMA, not tensor cores: exact but several times slower,
since TF32 would round the inputs to 10 mantissa bits) on CUDA, or on the CPU under
``TRITON_INTERPRET=1``; head dims up to 256. Triton is imported only when a kernel first runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from typing import Optional, Sequence

import torch

from ..patterns import BlockLocal, Fixed, Pattern, Periodic, Strided, Summary, head_runs

MAX_HEAD_DIM = 256
DECODE_QUERIES = 16
"""Calls with at most this many queries split their keys across programs (flash-decoding)."""
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the kernels take; others run the sparse backend."""


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: Optional[torch.device] = None) -> Optional[str]:
    """None when the Triton kernels can run on ``device`` (default: CUDA), else why not."""
    if not _installed():
        return "the triton package is not installed"
    on_cpu = device is not None and device.type == "cpu"
    if on_cpu and not _interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter)"
    if not on_cpu and not torch.cuda.is_available():
        return "no CUDA device"
    return None


def triton_status() -> str:
    """One line for ``attnkit info``: whether the GPU kernels can run here, and why not."""
    reason = triton_available()
    if reason is None or _interpreting():
        from importlib.metadata import version

        where = "CUDA" if reason is None else "CPU interpreter (TRITON_INTERPRET=1)"
        return f"available: triton {version('triton')} on {where}"
    return f"unavailable: {reason}"


def kernel_parts(pattern: Pattern) -> tuple:
    """The disjoint parts of a pattern without a head dimension: band parts where the pattern's
    facts give them, else one block-list part."""
    from .triton_blocks import BlocksPart

    return _band_parts(pattern) or (BlocksPart(pattern),)


def _band_parts(pattern: Pattern) -> Optional[tuple]:
    from .triton_band import BandPart

    band = pattern.band()
    if band is not None:
        return (BandPart(*band),)
    if isinstance(pattern, Strided):
        return BandPart(0, pattern.stride), BandPart(2, math.inf, step=pattern.stride)
    if isinstance(pattern, Fixed):
        s, c = pattern.stride, pattern.summary
        return BandPart(0, s - 1, segment=s), BandPart(0, math.inf, keys="summary", period=s, width=c)
    if isinstance(pattern, Periodic):
        return (BandPart(0, math.inf, step=pattern.stride),)
    if isinstance(pattern, BlockLocal):
        return (BandPart(0, pattern.stride - 1, segment=pattern.stride),)
    if isinstance(pattern, Summary):
        s, c = pattern.stride, pattern.summary
        return (BandPart(0, math.inf, keys="summary", period=s, width=c, own=True),)
    return None


def triton_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot take these (already validated) inputs, or None."""
    return triton_takes(q.device, q.dtype, q.shape[-1], v.shape[-1])


def triton_takes(device: torch.device, dtype: torch.dtype, head_dim: int, value_dim: int) -> Optional[str]:
    """:func:`triton_unsupported` for inputs described by their device, dtype and widths."""
    reason = triton_available(device)
    if reason is not None:
        return reason
    if dtype not in TRITON_DTYPES:
        return f"dtype {dtype} (the kernels take float16, bfloat16 and float32)"
    if max(head_dim, value_dim) > MAX_HEAD_DIM:
        return f"head dims {head_dim}/{value_dim} over {MAX_HEAD_DIM}"
    return None


MAX_SPLITS = 64


def _splits(n_q: int, key_tiles: int, programs: int, device: torch.device) -> int:
    """Key shares per query block: enough programs to fill the device, at least 2 tiles each.

    A power of two at most ``MAX_SPLITS``: the count is a compile-time constant of the kernel, and
    during decode the key count grows every step, so any other value would compile a new kernel
    at nearly every cache length; this way at most seven variants ever compile."""
    if n_q > DECODE_QUERIES:
        return 1
    slots = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16
    wanted = max(1, min(slots // max(programs, 1), key_tiles // 2, MAX_SPLITS))
    return 1 << (wanted.bit_length() - 1)


def _merge(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Results over disjoint key sets, ``(S, B, H, Nq, Dv)`` and ``(S, B, H, Nq)`` float32 each,
    merged into ``(B, H, Nq, Dv)`` float32 and ``(B, H, Nq)``; rows with no key: zeros, ``-inf``."""
    out, lse = torch.cat(list(outs)), torch.cat(list(lses))
    total = torch.logsumexp(lse, 0)
    weight = torch.exp(lse - total.masked_fill(total == -math.inf, 0.0))  # exp(-inf) = 0 on empty shares
    return (weight[..., None] * out).sum(0), total


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _part_splits(part, q: torch.Tensor, k: torch.Tensor) -> int:
    from .triton_band import BandPart, key_tiles

    if not isinstance(part, BandPart):
        return 1
    return _splits(q.shape[2], key_tiles(part, q.shape[2], k.shape[2]), q.shape[0] * q.shape[1], q.device)


def _part_forward(part, q, k, v, scale: float, out_dtype: torch.dtype, splits: int):
    from .triton_band import BandPart, band_forward
    from .triton_blocks import blocks_forward

    if isinstance(part, BandPart):
        return band_forward(part, q, k, v, scale, out_dtype, splits)
    return blocks_forward(part, q, k, v, scale, out_dtype)


def _part_backward(part, *args):
    from .triton_band import BandPart, band_backward
    from .triton_blocks import blocks_backward

    return (band_backward if isinstance(part, BandPart) else blocks_backward)(part, *args)


def _run_parts(parts: tuple, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    splits = [_part_splits(part, q, k) for part in parts]
    if splits == [1]:
        out, lse = _part_forward(parts[0], q, k, v, scale, q.dtype, 1)
        return out[0], lse[0]
    shares = [_part_forward(part, q, k, v, scale, torch.float32, n) for part, n in zip(parts, splits)]
    out, lse = _merge([o for o, _ in shares], [l for _, l in shares])
    return out.to(q.dtype), lse


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, parts, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _run_parts(parts, q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.scale = parts, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _last_dim_contiguous(grad_out)
        delta = (grad_out.float() * out.float()).sum(-1)
        if grad_lse is not None:  # d lse / d s = p: folds into the same ds = p * (dp - delta)
            delta = delta - grad_lse.float()
        with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
            grads = [_part_backward(part, q, k, v, grad_out, lse, delta.contiguous(), ctx.scale) for part in ctx.parts]
        dq, dk, dv = (sum(g[n] for g in grads) for n in range(3))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def triton_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of validated inputs by the Triton kernels: ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``,
    lse float32 natural log. Differentiable in q, k, v (and through lse). Every pattern runs;
    inputs the kernels do not take (float64, head dims over 256, an empty batch) run the sparse
    backend.

    Raises:
        ValueError: Triton cannot run here at all (not installed, no CUDA device, or CPU tensors
            without ``TRITON_INTERPRET=1``).
    """
    reason = triton_available(q.device)
    if reason is not None:
        raise ValueError(f"backend 'triton' cannot run: {reason}")
    if triton_unsupported(q, k, v) is not None or q.shape[0] == 0:  # an empty grid cannot be launched
        from .sparse import sparse_kernel

        return sparse_kernel(q, k, v, pattern, scale)
    runs = head_runs(pattern, q.shape[1], q.shape[1] // k.shape[1])
    plans = [kernel_parts(p) for _, _, p in runs]
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    # Triton launches on the current CUDA device, not the tensors' one: tensors on cuda:1 while
    # cuda:0 is current would be read from the wrong device.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for (first, stop, _), parts in zip(runs, plans):
            kv = slice(first // group, -(-stop // group))
            out, lse = _TritonAttention.apply(q[:, first:stop], k[:, kv], v[:, kv], parts, scale)
            outs.append(out)
            lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 1), torch.cat(lses, 1)


__all__ = [
    "DECODE_QUERIES", "MAX_HEAD_DIM", "TRITON_DTYPES", "kernel_parts", "triton_available", "triton_kernel",
    "triton_status", "triton_takes", "triton_unsupported",
]
