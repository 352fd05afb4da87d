"""Products and lookups with GGUF quantized weights kept in the file's blocks (native CPU kernel
``csrc/gguf_matmul.c``).

A quantized weight ``W (out, in)`` is the ``uint8`` tensor ``blocks (out, row_bytes)`` that the GGUF
file stores: each row is ``in / block_weights`` blocks of ``block_bytes`` bytes in one of the
:data:`FORMATS` (ggml's names; the layouts are described in ``csrc/gguf_formats.h``). Nothing is
repacked: a row of the file is a row here, so reordering rows (the Q/K permutation of llama.cpp's
converter) or concatenating the rows of several weights of one format is a tensor operation.

- :func:`quant_matmul` ``(x @ W.T)`` for float32 ``x (rows, in)``: the weights are dequantized in
  registers and multiplied in float32, so the result equals ``x @ quant_dequantize(...).T`` up to
  float32 rounding. One row (decoding) reads each weight byte once, four output channels at a
  time sharing each load of ``x``, with software prefetch spread over the loop; a few rows share
  each decoded piece. Speed per shape, cache-hot and cold, against the streaming read:
  ``benchmarks/quant_kernel_speed.py``. Many rows (a prefill) are better served by dequantizing tiles and calling a float matrix
  product (:func:`.quant_ops.quant_linear` does). With ``activations="int8"`` (an option) ``x`` is
  first quantized to int8 per block of 32 and multiplied by integer dot products (llama.cpp's
  method, ``csrc/gguf_int8.h``): the exact product of the rounded ``x``.
- :func:`quant_dequantize`: chosen rows (an embedding lookup) or all rows as float32, bit for bit
  the values of the ``gguf`` package's dequantization.

Both run on :func:`kernel_threads` threads (``torch.get_num_threads()`` unless
:func:`set_kernel_threads` says otherwise) of the kernel's own pool, which share a call by taking
chunks from a counter (see ``csrc/gguf_pool.h``). :mod:`.quant_ops` builds the products a
layer needs on them (and registers them as torch custom ops).

Without the native library (no C compiler, ``ATTNKIT_NATIVE=0``) the same values come from the
``gguf`` package's numpy dequantization and a torch product, much slower.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .native_build import add_status_note, load_native

_SOURCE = "gguf_matmul"
_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
ACTIVATIONS = ("float32", "int8")
"""How :func:`quant_matmul` takes its activations: exact float32, or quantized to int8 per block."""
ACTIVATION_BLOCK = 32
"""Activations per int8 block (one scale each) of ``activations="int8"``."""
_ERRORS = {1: "unknown block format", 2: "sizes that are not whole blocks", 3: "a row index out of range",
           4: "could not allocate memory for the group sums of x"}


@dataclass(frozen=True)
class QuantFormat:
    """A GGUF block format: ``block_weights`` weights stored in ``block_bytes`` bytes.

    ``fields``: the byte ranges of a block that the kernel layout stores field by field (see
    :func:`to_kernel_layout`); empty when the kernels read the file's blocks as they are.
    """

    name: str
    ggml_type: int
    block_weights: int
    block_bytes: int
    fields: tuple[tuple[int, int], ...] = ()

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one row of ``in_features`` weights (a whole number of blocks)."""
        return in_features // self.block_weights * self.block_bytes

    def in_features(self, row_bytes: int) -> int:
        """Weights in a row of ``row_bytes`` bytes."""
        return row_bytes // self.block_bytes * self.block_weights


FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("Q8_0", 8, 32, 34, ((0, 2), (2, 34))),
    QuantFormat("Q4_1", 3, 32, 20, ((0, 2), (2, 4), (4, 20))),
    QuantFormat("Q5_0", 6, 32, 22, ((0, 2), (2, 6), (6, 22))),
    QuantFormat("Q4_K", 12, 256, 144),
    QuantFormat("Q6_K", 14, 256, 210),
)}
"""The formats the kernels read, by ggml's name: those of SmolLM2 (Q4_1, Q8_0) and Gemma 3 (Q4_K,
Q5_0, Q6_K, Q8_0) as their GGUF files ship them."""


def quant_format(name: str) -> QuantFormat:
    """The :class:`QuantFormat` called ``name``; ValueError listing the formats otherwise."""
    if name not in FORMATS:
        raise ValueError(f"quantized format {name!r} is not supported; the kernels read {', '.join(FORMATS)}")
    return FORMATS[name]


def to_kernel_layout(blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The kernels' layout of GGUF rows ``blocks (out, row_bytes)``: the same bytes, with each row's
    blocks regrouped field by field (for Q4_1: every block's ``d``, then every ``m``, then every
    block's nibbles), so that a row's scales are contiguous. Formats without ``fields`` (the
    K-quants, whose super-blocks keep their scales together) are returned as they are."""
    if not fmt.fields:
        return blocks
    # numpy's copies: a single thread, several times faster than torch's for these byte strides
    rows = blocks.numpy().reshape(blocks.shape[0], -1, fmt.block_bytes)
    return torch.from_numpy(np.concatenate([rows[:, :, start:stop].reshape(blocks.shape[0], -1)
                                            for start, stop in fmt.fields], axis=1))


def to_gguf_layout(packed: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """The GGUF rows of ``packed``: the inverse of :func:`to_kernel_layout`."""
    if not fmt.fields:
        return packed
    n_blocks, rows = packed.shape[1] // fmt.block_bytes, packed.numpy()
    parts, at = [], 0
    for start, stop in fmt.fields:
        size = (stop - start) * n_blocks
        parts.append(rows[:, at:at + size].reshape(packed.shape[0], n_blocks, stop - start))
        at += size
    return torch.from_numpy(np.concatenate(parts, axis=2).reshape(packed.shape[0], -1))


def _library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    library = load_native(_SOURCE, isa).library
    if library is not None and not getattr(library, "_attnkit_typed", False):
        library.gguf_matmul.argtypes = [_INT, _POINTER, _INT64, _INT64, _POINTER, _INT64, _POINTER, _INT, _INT]
        library.gguf_dequantize.argtypes = [_INT, _POINTER, _INT64, _INT64, _POINTER, _INT64, _POINTER, _INT]
        for name in ("gguf_matmul", "gguf_dequantize", "gguf_block_weights", "gguf_block_bytes"):
            getattr(library, name).restype = _INT
        for f in FORMATS.values():  # the Python table and the C one must agree
            if (library.gguf_block_weights(f.ggml_type), library.gguf_block_bytes(f.ggml_type)) != (
                    f.block_weights, f.block_bytes):
                raise RuntimeError(f"{_SOURCE}: the library's {f.name} blocks differ from quant_native.FORMATS")
        library._attnkit_typed = True
    return library


_threads: Optional[int] = None


def set_kernel_threads(threads: Optional[int]) -> None:
    """Threads of the kernels' pool: ``threads`` (>= 1), or None to follow ``torch.get_num_threads()``
    (the default). ValueError for another value."""
    global _threads
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"set_kernel_threads: threads must be a positive int or None, got {threads!r}")
    _threads = threads


def kernel_threads() -> int:
    """Threads the next kernel call may use (see :func:`set_kernel_threads`)."""
    return torch.get_num_threads() if _threads is None else _threads


def quant_native_available(isa: Optional[str] = None) -> bool:
    """Whether the kernel library is built for ``isa`` (``$ATTNKIT_NATIVE_ISA`` when None)."""
    return _library(isa) is not None


def _check_blocks(where: str, blocks: torch.Tensor, fmt: QuantFormat) -> int:
    """``in_features`` of ``blocks (out, row_bytes)``; ValueError naming ``where`` when it is not a
    contiguous uint8 CPU tensor of whole ``fmt`` blocks."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.device.type != "cpu":
        raise ValueError(f"{where}: blocks must be a 2-D uint8 CPU tensor (out, row_bytes), got "
                         f"{blocks.dtype} {tuple(blocks.shape)} on {blocks.device}")
    if blocks.shape[1] % fmt.block_bytes:
        raise ValueError(f"{where}: rows of {blocks.shape[1]} bytes are not whole {fmt.name} blocks "
                         f"({fmt.block_bytes} bytes each)")
    return fmt.in_features(blocks.shape[1])


def _status(where: str, status: int) -> None:
    if status:
        raise RuntimeError(f"{where}: native kernel failed: {_ERRORS.get(status, f'status {status}')}")


def _numpy_dequantize(blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """float32 ``(rows, in)`` by the ``gguf`` package (the reference and the fallback)."""
    from gguf import GGMLQuantizationType, quants  # optional package, imported only without the library

    values = quants.dequantize(to_gguf_layout(blocks, fmt).contiguous().numpy(), GGMLQuantizationType(fmt.ggml_type))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(blocks.shape[0], -1)


def quant_dequantize(blocks: torch.Tensor, fmt: QuantFormat, rows: Optional[torch.Tensor] = None, *,
                     out: Optional[torch.Tensor] = None, isa: Optional[str] = None) -> torch.Tensor:
    """float32 values of the quantized weight ``blocks (out, row_bytes)`` in format ``fmt``.

    Args:
        blocks: ``(out, row_bytes)`` uint8 CPU tensor, one row per output channel in the kernel
            layout (:func:`to_kernel_layout` of the file's rows).
        fmt: its format (see :data:`FORMATS`).
        rows: int64 indices of the rows to return, any shape (an embedding lookup); None: all.
        out: a contiguous float32 CPU tensor of the result's size to write into (a reused buffer).
        isa: the build to use (``$ATTNKIT_NATIVE_ISA`` when None).

    Returns:
        ``(*rows.shape, in)`` (``(out, in)`` for all rows) float32, the ``gguf`` package's values.

    Raises:
        ValueError: for blocks that are not whole rows of ``fmt``, or ``rows`` not integer.
        IndexError: for a row index outside ``[0, out)``.
    """
    in_features = _check_blocks("quant_dequantize", blocks, fmt)
    if rows is not None and (rows.dtype.is_floating_point or rows.dtype == torch.bool or rows.device.type != "cpu"):
        raise ValueError(f"quant_dequantize: rows must be an integer CPU tensor, got {rows.dtype} on {rows.device}")
    count = blocks.shape[0] if rows is None else rows.numel()
    shape = (blocks.shape[0], in_features) if rows is None else (*rows.shape, in_features)
    if out is None:
        out = torch.empty(shape)
    elif out.dtype != torch.float32 or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != count * in_features:
        raise ValueError(f"quant_dequantize: out must be a contiguous float32 CPU tensor of {count * in_features} "
                         f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
    library = _library(isa)
    if library is None:
        index = torch.arange(blocks.shape[0]) if rows is None else rows.reshape(-1)
        if index.numel() and not bool(((index >= 0) & (index < blocks.shape[0])).all()):
            raise IndexError(f"quant_dequantize: row indices must lie in [0, {blocks.shape[0]})")
        return out.view(shape).copy_(_numpy_dequantize(blocks[index], fmt).reshape(shape))
    blocks = blocks.contiguous()
    index = None if rows is None else rows.reshape(-1).to(torch.int64).contiguous()
    status = library.gguf_dequantize(fmt.ggml_type, blocks.data_ptr(), blocks.shape[0], in_features,
                                     None if index is None else index.data_ptr(), count, out.data_ptr(),
                                     kernel_threads())
    if status == 3:
        raise IndexError(f"quant_dequantize: row indices must lie in [0, {blocks.shape[0]})")
    _status("quant_dequantize", status)
    return out.view(shape)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq, d)``: float ``x (..., in)`` quantized as the int8 kernels quantize it, per block of
    :data:`ACTIVATION_BLOCK` values: ``d = max |x| / 127`` per block ``(..., in / 32)`` and
    ``xq = round(x / d)`` int8 (ties to even; 0 for an all-zero block). ``xq * d`` is the value the
    products use; the reference for their error bound (``|x - xq d| <= d / 2``)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, ACTIVATION_BLOCK)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    return (torch.round(blocks * inverse).to(torch.int8).reshape(x.shape),
            (largest / 127.0).squeeze(-1))


def quant_matmul(x: torch.Tensor, blocks: torch.Tensor, fmt: QuantFormat, *, activations: str = "float32",
                 isa: Optional[str] = None) -> torch.Tensor:
    """``x @ W.T`` for the quantized weight ``W`` held in ``blocks`` (format ``fmt``).

    Args:
        x: ``(rows, in)`` float32 CPU activations.
        blocks: ``(out, row_bytes)`` uint8 CPU tensor, one row per output channel in the kernel
            layout (:func:`to_kernel_layout` of the file's rows).
        fmt: the blocks' format (see :data:`FORMATS`).
        activations: ``"float32"``: the weights are converted to float32 in registers, the product
            is exact up to float32 rounding; ``"int8"``: each row of ``x`` is quantized to int8 per
            block of 32 (:func:`quantize_activations`) and multiplied by the weights' integers with
            integer dot products (VNNI where the CPU has it), llama.cpp's method: the exact product
            of the rounded ``x``, off from ``x @ W.T`` by at most ``d / 2 * sum |W|`` per block of
            32 (plus float32 rounding). With AVX-512 VNNI one row takes two blocks per 512-bit
            dot product (Q6_K one).
        isa: the build to use (``$ATTNKIT_NATIVE_ISA`` when None).

    Returns:
        ``(rows, out)`` float32: ``x @ quant_dequantize(blocks, fmt).T`` up to float32 rounding
        (the kernel's own accumulation order), and the activations' quantization for ``"int8"``.

    Raises:
        ValueError: for inputs of the wrong dtype, device or shape, or an unknown ``activations``.
    """
    in_features = _check_blocks("quant_matmul", blocks, fmt)
    if x.dim() != 2 or x.shape[1] != in_features or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"quant_matmul: x must be a float32 CPU tensor (rows, {in_features}), got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    if activations not in ACTIVATIONS:
        raise ValueError(f"quant_matmul: activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    library = _library(isa)
    if library is None:
        if activations == "int8":
            xq, d = quantize_activations(x)
            x = (xq.float().view(x.shape[0], -1, ACTIVATION_BLOCK) * d.unsqueeze(-1)).view(x.shape)
        return x @ _numpy_dequantize(blocks, fmt).T
    x, blocks = x.contiguous(), blocks.contiguous()
    out = torch.empty(x.shape[0], blocks.shape[0])
    _status("quant_matmul", library.gguf_matmul(fmt.ggml_type, x.data_ptr(), x.shape[0], in_features,
                                                blocks.data_ptr(), blocks.shape[0], out.data_ptr(),
                                                kernel_threads(), activations == "int8"))
    return out


add_status_note(_SOURCE, lambda: "GGUF quantized weights kept in their blocks (Q8_0 Q4_1 Q5_0 Q4_K Q6_K)")

__all__ = ["ACTIVATIONS", "ACTIVATION_BLOCK", "FORMATS", "QuantFormat", "quant_dequantize", "quant_format",
           "kernel_threads", "quant_matmul", "quant_native_available", "quantize_activations",
           "set_kernel_threads", "to_gguf_layout", "to_kernel_layout"]
