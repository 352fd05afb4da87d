"""The launcher of the Triton kernels: a pattern becomes kernel launches, forward and backward.

A pattern is split into disjoint *parts* that each run one kernel; the parts run in turn, each
merging its result by log-sum-exp into the previous parts' in its epilogue, and the last writes the
output dtype; the backward pass gives every part the merged LSE, so each contributes exactly its
share of dQ, dK, dV, and the last part to touch a row writes it in the input dtype. The parts are
the pattern's own pieces (:attr:`~attnkit.patterns.Pattern.pieces`, declared once by the pattern,
never found by evaluating it on the ``Nq x Nk`` square), run by the band kernels of
:mod:`~attnkit.kernels.triton_band`: a band (windows, causal, their intersections), Strided's band
and periodic residues, Fixed's segmented band and summary columns, ``Periodic``, ``BlockLocal``,
``Summary``. Anything else (``BlockSparse`` layouts, unions, predicates) runs the block-list
kernels of :mod:`~attnkit.kernels.triton_blocks`, which walk per-query-block lists of key blocks.

Decode-sized calls (up to :data:`DECODE_QUERIES` queries) run the decode configuration: a GQA
group's heads packed into a 16-row query tile, wide key tiles, the keys split across programs
(flash-decoding) and the shares merged in one kernel.

A score modification (softcap, alibi, distance_bias: :data:`TRITON_SCORE_MODS`) goes to every
kernel of every part (:mod:`~attnkit.kernels.triton_mods`); its parameter is an input of the
autograd function, and the parts' shares of its gradient add up in the backward.

Inputs: float16, bfloat16 (the fast path: tensor cores, float32 accumulation) or float32 (three
TF32 products per product, "tf32x3": float32 accuracy on tensor cores) on CUDA, or on the CPU
under ``TRITON_INTERPRET=1``; head dims up to 256. Triton is imported only when a kernel first runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
from typing import Optional, Sequence

import torch

from ..patterns import SUMMARY, Pattern, Piece, head_runs

MAX_HEAD_DIM = 256
DECODE_QUERIES = 16
"""Calls with at most this many queries run the decode configuration (keys split across programs)."""
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the kernels take; others run the sparse backend."""
MAX_SPLITS = 64
TRITON_SCORE_MODS = ("softcap", "alibi", "distance_bias")
"""The score mods the kernels apply (:mod:`~attnkit.kernels.triton_mods`; a Python callable runs
only on the reference and dense backends)."""


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
    """The disjoint parts of a pattern without a head dimension: its pieces where the band kernels
    take them, else one block-list part."""
    from .triton_blocks import BlocksPart

    return _band_parts(pattern) or (BlocksPart(pattern),)


def _band_parts(pattern: Pattern) -> Optional[tuple]:
    """The pattern's own pieces (:attr:`~attnkit.patterns.Pattern.pieces`) when the band kernels
    take them all, else None (block lists). They take lattice pieces (a segment only on a lattice
    of step 1) and summary pieces ``lo >= 0, hi = inf``; in a plan of several pieces the first
    reaches every key (the backward's accumulation relies on it)."""
    from .triton_band import touched_keys

    pieces = pattern.pieces
    if not pieces or not all(_band_kernel_takes(p) for p in pieces):
        return None
    if len(pieces) > 1 and touched_keys(pieces[0]) != (1, 1):
        return None
    return tuple(pieces)


def _band_kernel_takes(piece: Piece) -> bool:
    if piece.documents:  # the band kernels have no document cut: block lists run them, from allows
        return False
    if piece.keys == SUMMARY:
        return piece.lo >= 0 and piece.hi == math.inf
    return piece.segment == 0 or piece.step == 1


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


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _splits(key_tiles: int, programs: int, device: torch.device) -> int:
    """Key shares per query tile of a decode call: enough programs to fill the device, at least
    2 key tiles each.

    A power of two at most :data:`MAX_SPLITS`: the count is a compile-time constant of the kernel,
    and during decode the key count grows every step, so any other value would compile a new
    kernel at nearly every cache length; this way at most seven variants ever compile."""
    wanted = max(1, min(2 * _multiprocessors(device) // max(programs, 1), key_tiles // 2, MAX_SPLITS))
    return 1 << (wanted.bit_length() - 1)


def _decode_splits(parts: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   score_mod=None) -> Optional[list[int]]:
    """The key shares of each part of a decode-sized call (with ``score_mod``), or None when the
    call is not one (more queries, or a block-list part)."""
    from .triton_band import decode_tiles, key_tiles

    if q.shape[2] > DECODE_QUERIES or not all(isinstance(p, Piece) for p in parts):
        return None
    block_n = decode_tiles(q, v, score_mod)[1]
    programs = q.shape[0] * k.shape[1]  # one (batch, KV head) per program, before splitting
    return [_splits(key_tiles(p, q.shape[2], k.shape[2], block_n), programs * p.step, q.device) for p in parts]


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(parts: tuple, q, k, v, scale: float, score_mod=None) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_band import band_forward
    from .triton_blocks import BlocksPart, blocks_forward
    from .triton_merge import merge_partials

    batch, n_heads, n_q, _ = q.shape
    shape = (batch, n_heads, n_q, v.shape[-1])
    splits = _decode_splits(parts, q, k, v, score_mod)
    if splits is not None and sum(splits) > 1:
        partial_out = torch.empty(sum(splits), *shape, device=q.device, dtype=torch.float32)
        partial_lse = torch.empty(sum(splits), *shape[:3], device=q.device, dtype=torch.float32)
        for part, n, slot0 in zip(parts, splits, _starts(splits)):
            band_forward(part, q, k, v, scale, partial_out, partial_lse, decode=(n, slot0), score_mod=score_mod)
        return merge_partials(partial_out, partial_lse, q.dtype)
    out = torch.empty(shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(shape[:3], device=q.device, dtype=torch.float32)
    if splits is not None:  # one part, one share
        band_forward(parts[0], q, k, v, scale, out, lse, decode=(1, 0), score_mod=score_mod)
        return out, lse
    if isinstance(parts[0], BlocksPart):  # always alone
        blocks_forward(parts[0], q, k, v, scale, out, lse, score_mod)
        return out, lse
    scratch = [(torch.empty(shape, device=q.device, dtype=torch.float32),
                torch.empty(shape[:3], device=q.device, dtype=torch.float32)) for _ in range(min(2, len(parts) - 1))]
    prev = None
    for index, part in enumerate(parts):
        target = (out, lse) if index == len(parts) - 1 else scratch[index % 2]
        band_forward(part, q, k, v, scale, *target, prev=prev, score_mod=score_mod)
        prev = target
    return out, lse


def _starts(counts: Sequence[int]) -> list[int]:
    return [sum(counts[:n]) for n in range(len(counts))]


def _later_keys(parts: tuple, index: int) -> Optional[tuple[int, int]]:
    """``touched_keys`` of the parts after ``index`` together (None: there are none)."""
    from .triton_band import touched_keys

    later = {touched_keys(p) for p in parts[index + 1:]}
    if not later:
        return None
    if (1, 1) in later:
        return (1, 1)
    if len(later) > 1:
        raise ValueError(f"parts {parts} touch key sets the kernels cannot describe together")
    return later.pop()


def _backward(parts: tuple, q, k, v, out, lse, grad_out, grad_lse, scale: float,
              score_mod=None) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dparameter)``: the first three in the inputs' dtypes, contiguous, given the
    merged ``out`` and ``lse`` (and ``grad_lse``, None = zero); ``dparameter`` the gradient of
    ``score_mod``'s parameter (float32, its shape; None when it has none)."""
    from .triton_band import band_backward, touched_keys
    from .triton_blocks import BlocksPart, blocks_backward
    from .triton_merge import backward_delta

    delta = backward_delta(out, grad_out, grad_lse)
    grads = (torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype),
             torch.empty(v.shape, device=v.device, dtype=v.dtype))
    if isinstance(parts[0], BlocksPart):
        d_parameter = blocks_backward(parts[0], q, k, v, grad_out, lse, delta, scale, grads, score_mod)
        return (*grads, _parameter_shaped(d_parameter, score_mod))
    if touched_keys(parts[0]) != (1, 1):  # Summary alone: the keys it does not reach get no gradient
        grads[1].zero_()
        grads[2].zero_()
    scratch = [tuple(torch.empty(g.shape, device=g.device, dtype=torch.float32) for g in grads)
               for _ in range(min(2, len(parts) - 1))]
    d_parameter = None
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        read = scratch[(index - 1) % 2] if index else None
        write = None if last else scratch[index % 2]
        share = band_backward(part, q, k, v, grad_out, lse, delta, scale, grads, (read, write),
                              _later_keys(parts, index), score_mod)
        d_parameter = share if d_parameter is None else d_parameter + share
    return (*grads, _parameter_shaped(d_parameter, score_mod))


def _parameter_shaped(d_parameter: Optional[torch.Tensor], score_mod) -> Optional[torch.Tensor]:
    """A kernel's ``(Hq, 1 or R)`` parameter gradient in the parameter's shape (None stays None)."""
    return None if d_parameter is None else d_parameter.view(score_mod.parameter.shape)


class _TritonAttention(torch.autograd.Function):
    """Inputs ``(q, k, v, parameter, parts, scale, score_mod)``: ``parameter`` is the score mod's
    slopes or table (or None), passed apart so that autograd returns its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, parameter, parts, scale, score_mod):
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not a tensor of zeros
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        out, lse = _forward(parts, q, k, v, scale, score_mod)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.parts, ctx.scale, ctx.score_mod = parts, scale, score_mod
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else _last_dim_contiguous(grad_out)
        with _on_device(q):
            dq, dk, dv, d_parameter = _backward(ctx.parts, q, k, v, out, lse, grad_out, grad_lse, ctx.scale,
                                                ctx.score_mod)
        if d_parameter is not None:
            d_parameter = d_parameter.to(ctx.score_mod.parameter.dtype)
        return dq, dk, dv, d_parameter, None, None, None


def _on_device(t: torch.Tensor):
    # Triton launches on the current CUDA device, not the tensors' one: tensors on cuda:1 while
    # cuda:0 is current would be read from the wrong device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _runs(pattern: Pattern, q: torch.Tensor, k: torch.Tensor):
    """``(query heads, KV heads, parts)`` per run of query heads sharing one pattern."""
    group = q.shape[1] // k.shape[1]
    for first, stop, run_pattern in head_runs(pattern, q.shape[1], group):
        yield slice(first, stop), slice(first // group, -(-stop // group)), kernel_parts(run_pattern)


def _check_runnable(q: torch.Tensor) -> None:
    reason = triton_available(q.device)
    if reason is not None:
        raise ValueError(f"backend 'triton' cannot run: {reason}")


def triton_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float, score_mod=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of validated inputs by the Triton kernels: ``(out (B, Hq, Nq, Dv), lse (B, Hq, Nq))``,
    lse float32 natural log. Differentiable in q, k, v (and through lse), and in the parameter of
    ``score_mod`` (softcap, alibi or distance_bias, :mod:`~attnkit.kernels.triton_mods`; None:
    none). Every pattern runs; inputs the kernels do not take (float64, head dims over 256, an
    empty batch) run the sparse backend.

    Raises:
        ValueError: Triton cannot run here at all (not installed, no CUDA device, or CPU tensors
            without ``TRITON_INTERPRET=1``).
    """
    _check_runnable(q)
    if triton_unsupported(q, k, v) is not None or q.shape[0] == 0:  # an empty grid cannot be launched
        from .sparse import sparse_kernel

        return sparse_kernel(q, k, v, pattern, scale, score_mod=score_mod)
    outs, lses = [], []
    with _on_device(q):
        for heads, kv_heads, parts in _runs(pattern, q, k):
            run_mod = None if score_mod is None else score_mod.for_heads(heads.start, heads.stop)
            out, lse = _TritonAttention.apply(q[:, heads], k[:, kv_heads], v[:, kv_heads],
                                              None if run_mod is None else run_mod.parameter, parts, scale, run_mod)
            outs.append(out)
            lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 1), torch.cat(lses, 1)


def triton_grad_share(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    d_out: torch.Tensor, d_lse: Optional[torch.Tensor], pattern: Pattern, scale: float, score_mod=None,
) -> tuple[torch.Tensor, ...]:
    """The share of ``(dq, dk, dv, dparameter)`` flowing through keys ``k``/``v`` when
    ``out``/``lse`` are the results over a larger key set (see
    :meth:`attnkit.backends.base.Backend.grad_share`), by the kernels' own backward;
    ``dparameter`` is that of ``score_mod``'s parameter (float32; None when it has none). Inputs
    as :func:`triton_kernel` takes them (the kernels take them)."""
    _check_runnable(q)
    q, k, v, d_out = (_last_dim_contiguous(t) for t in (q, k, v, d_out))
    out, lse = out.contiguous(), lse.float().contiguous()
    d_lse = d_lse.float() if d_lse is not None else None
    runs = list(_runs(pattern, q, k))
    with _on_device(q):
        if len(runs) == 1:
            return _backward(runs[0][2], q, k, v, out, lse, d_out, d_lse, scale, score_mod)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_parameter = None if score_mod is None or score_mod.parameter is None else \
            torch.zeros(score_mod.parameter.shape, device=q.device, dtype=torch.float32)
        for heads, kv_heads, parts in runs:
            run_mod = None if score_mod is None else score_mod.for_heads(heads.start, heads.stop)
            grads = _backward(parts, q[:, heads], k[:, kv_heads], v[:, kv_heads], out[:, heads].contiguous(),
                              lse[:, heads].contiguous(), d_out[:, heads], None if d_lse is None else d_lse[:, heads],
                              scale, run_mod)
            dq[:, heads] = grads[0]
            dk[:, kv_heads] += grads[1]  # runs of single heads may share a KV head
            dv[:, kv_heads] += grads[2]
            if d_parameter is not None:
                d_parameter[heads] = grads[3]
    return dq, dk, dv, d_parameter


__all__ = [
    "DECODE_QUERIES", "MAX_HEAD_DIM", "TRITON_DTYPES", "TRITON_SCORE_MODS", "kernel_parts", "triton_available", "triton_grad_share",
    "triton_kernel", "triton_status", "triton_takes", "triton_unsupported",
]
