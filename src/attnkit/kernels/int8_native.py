"""Weight-only int8 products by the native CPU kernel ``csrc/int8_matvec.c``.

``y = (x @ q.T) * scales`` for int8 weights ``q (out, in)`` with one float32 scale per output
channel, and float32 or bfloat16 activations ``x (rows, in)``: each output is accumulated in float32
from the int8 values widened in registers, scaled in float32 and rounded once to ``x``'s dtype. The
kernel reads the weight once per call, so for the few rows of a decoding step it runs at the speed
the machine streams memory; it splits the output channels over ``torch.get_num_threads()`` threads.

The kernel takes the weight in a packed layout (:func:`pack_int8`), made once per layer: blocks of
``PACK_CHANNELS`` channels, each stored as chunks of ``PACK_CHUNK`` inputs of one channel after the
other, so that the kernel reads the weight as one sequential stream. :func:`unpack_int8` gives the
``(out, in)`` rows back.

:func:`int8_native_available` says whether the library is built (see
:mod:`~attnkit.kernels.native_build`); without it callers use torch operations for the same product.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch

from .native_build import add_status_note, load_native

_POINTER, _INT64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_ERRORS = {1: "negative sizes", 2: "could not allocate memory for the float32 copy of x"}
_DTYPES = (torch.float32, torch.bfloat16)
PACK_CHANNELS = 4
"""Output channels per block of the packed layout (the kernel's register block)."""
PACK_CHUNK = 64
"""Inputs of one channel stored together in the packed layout (one cache line of int8)."""


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """``(blocks, chunks, PACK_CHANNELS, PACK_CHUNK)``: the packed layout of an ``(out, in)`` weight."""
    return (-(-out_features // PACK_CHANNELS), -(-in_features // PACK_CHUNK), PACK_CHANNELS, PACK_CHUNK)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of ``q (out, in)`` (any device): ``packed[b, j, c, i] = q[b * PACK_CHANNELS
    + c, j * PACK_CHUNK + i]``, zero past ``out`` and ``in``; contiguous, of :func:`packed_shape`."""
    if q.dim() != 2:
        raise ValueError(f"pack_int8: q must be (out, in), got shape {tuple(q.shape)}")
    blocks, chunks, channels, chunk = packed_shape(*q.shape)
    padded = torch.nn.functional.pad(q, (0, chunks * chunk - q.shape[1], 0, blocks * channels - q.shape[0]))
    return padded.view(blocks, channels, chunks, chunk).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The ``(out, in)`` rows of a :func:`pack_int8` layout (a new contiguous tensor)."""
    if tuple(packed.shape) != packed_shape(out_features, in_features):
        raise ValueError(f"unpack_int8: packed must have shape {packed_shape(out_features, in_features)} for a "
                         f"({out_features}, {in_features}) weight, got {tuple(packed.shape)}")
    blocks, chunks, channels, chunk = packed.shape
    rows = packed.transpose(1, 2).reshape(blocks * channels, chunks * chunk)
    return rows[:out_features, :in_features].contiguous()


def _library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    library = load_native("int8_matvec", isa).library
    if library is not None and not hasattr(library, "_attnkit_typed"):
        library.int8_matvec.argtypes = [_POINTER, _INT, _POINTER, _POINTER, _POINTER, _INT,
                                        _INT64, _INT64, _INT64, _INT]
        library.int8_matvec.restype = _INT
        library.int8_widen.argtypes = [_POINTER, _POINTER, _INT, _INT64]
        library.int8_widen.restype = None
        if (library.int8_matvec_channels(), library.int8_matvec_chunk()) != (PACK_CHANNELS, PACK_CHUNK):
            raise RuntimeError("int8_matvec: the library's packed layout differs from PACK_CHANNELS / PACK_CHUNK")
        library._attnkit_typed = True
    return library


def int8_native_available(isa: Optional[str] = None) -> bool:
    """Whether the kernel's library is built for ``isa`` (default ``$ATTNKIT_NATIVE_ISA``)."""
    return _library(isa) is not None


def int8_native_supports(x: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether :func:`int8_matmul` takes these inputs: CPU tensors, ``x`` float32 or bfloat16, and a
    built library."""
    return (x.device.type == "cpu" and packed.device.type == "cpu" and x.dtype in _DTYPES
            and packed.dtype == torch.int8 and int8_native_available())


def int8_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, *,
                isa: Optional[str] = None) -> torch.Tensor:
    """``(x @ q.T) * scales`` by the native kernel, for ``packed = pack_int8(q)``.

    Args:
        x: ``(rows, in)`` float32 or bfloat16 CPU activations.
        packed: the int8 CPU weights ``q (out, in)`` in the layout of :func:`pack_int8`.
        scales: ``(out,)`` float32 per-output-channel scales (they give ``out``).
        isa: the build to use (``$ATTNKIT_NATIVE_ISA`` when None).

    Returns:
        ``(rows, out)`` in ``x``'s dtype.

    Raises:
        ValueError: for inputs of the wrong dtype, device or shape.
        RuntimeError: when the library is not available.
    """
    if x.dim() != 2 or scales.dim() != 1:
        raise ValueError(f"int8_matmul: x must be (rows, in) and scales (out,), got {tuple(x.shape)} and "
                         f"{tuple(scales.shape)}")
    out_features, in_features = scales.shape[0], x.shape[1]
    if tuple(packed.shape) != packed_shape(out_features, in_features):
        raise ValueError(f"int8_matmul: packed must be pack_int8 of an ({out_features}, {in_features}) weight, shape "
                         f"{packed_shape(out_features, in_features)}, got {tuple(packed.shape)}")
    if x.dtype not in _DTYPES or packed.dtype != torch.int8 or x.device.type != "cpu" or packed.device.type != "cpu":
        raise ValueError(f"int8_matmul: x must be float32/bfloat16 and packed int8, both on the CPU, got "
                         f"{x.dtype} on {x.device} and {packed.dtype} on {packed.device}")
    if scales.dtype != torch.float32 or scales.device.type != "cpu":
        raise ValueError(f"int8_matmul: scales must be a float32 CPU tensor, got {scales.dtype} on {scales.device}")
    library = _library(isa)
    if library is None:
        raise RuntimeError(f"int8_matmul: the native kernel is unavailable: {load_native('int8_matvec', isa).message}")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    status = library.int8_matvec(x.data_ptr(), int(x.dtype == torch.bfloat16), packed.data_ptr(), scales.data_ptr(),
                                 out.data_ptr(), int(out.dtype == torch.bfloat16), x.shape[0], out_features,
                                 in_features, torch.get_num_threads())
    if status:
        raise RuntimeError(f"int8_matmul: native kernel failed: {_ERRORS.get(status, f'status {status}')}")
    return out


def widen_into(q: torch.Tensor, out: torch.Tensor) -> None:
    """``out.copy_(q)`` for an int8 ``q`` and a float32 or bfloat16 ``out`` of the same shape, both
    contiguous on the CPU, by the native kernel when it is built (several times faster than torch's
    conversion) and by ``copy_`` otherwise. The values are exact in either dtype."""
    library = _library()
    if (library is None or out.dtype not in _DTYPES or q.dtype != torch.int8 or out.shape != q.shape
            or not (q.is_contiguous() and out.is_contiguous()) or q.device.type != "cpu" or out.device.type != "cpu"):
        out.copy_(q)
        return
    library.int8_widen(q.data_ptr(), out.data_ptr(), int(out.dtype == torch.bfloat16), q.numel())


add_status_note("int8_matvec", lambda: "weight-only int8 products of few rows (--int8 decoding on the CPU)")

__all__ = ["PACK_CHANNELS", "PACK_CHUNK", "int8_matmul", "int8_native_available", "int8_native_supports",
           "pack_int8", "packed_shape", "unpack_int8", "widen_into"]
