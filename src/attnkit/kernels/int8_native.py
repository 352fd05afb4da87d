"""Weight-only int8 products by the native CPU kernel ``csrc/int8_matvec.c``.

``y = (x @ q.T) * scales`` for int8 weights ``q (out, in)`` with one float32 scale per output
channel, and float32 or bfloat16 activations ``x (rows, in)``: each output is accumulated in float32
from the int8 values widened in registers, scaled in float32 and rounded once to ``x``'s dtype. The
kernel reads the weight once per call, so for the few rows of a decoding step it runs at the speed
the machine streams memory; it splits the output channels over ``torch.get_num_threads()`` threads.

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


def _library(isa: Optional[str] = None) -> Optional[ctypes.CDLL]:
    library = load_native("int8_matvec", isa).library
    if library is not None and not hasattr(library, "_attnkit_typed"):
        library.int8_matvec.argtypes = [_POINTER, _INT, _POINTER, _POINTER, _POINTER, _INT,
                                        _INT64, _INT64, _INT64, _INT]
        library.int8_matvec.restype = _INT
        library.int8_widen.argtypes = [_POINTER, _POINTER, _INT, _INT64]
        library.int8_widen.restype = None
        library._attnkit_typed = True
    return library


def int8_native_available(isa: Optional[str] = None) -> bool:
    """Whether the kernel's library is built for ``isa`` (default ``$ATTNKIT_NATIVE_ISA``)."""
    return _library(isa) is not None


def int8_native_supports(x: torch.Tensor, q: torch.Tensor) -> bool:
    """Whether :func:`int8_matmul` takes these inputs: CPU tensors, ``x`` float32 or bfloat16, and a
    built library."""
    return (x.device.type == "cpu" and q.device.type == "cpu" and x.dtype in _DTYPES
            and q.dtype == torch.int8 and int8_native_available())


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *, isa: Optional[str] = None) -> torch.Tensor:
    """``(x @ q.T) * scales`` by the native kernel.

    Args:
        x: ``(rows, in)`` float32 or bfloat16 CPU activations.
        q: ``(out, in)`` int8 CPU weights.
        scales: ``(out,)`` float32 per-output-channel scales.
        isa: the build to use (``$ATTNKIT_NATIVE_ISA`` when None).

    Returns:
        ``(rows, out)`` in ``x``'s dtype.

    Raises:
        ValueError: for inputs of the wrong dtype, device or shape.
        RuntimeError: when the library is not available.
    """
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"int8_matmul: x must be (rows, in) and q (out, in), got {tuple(x.shape)} and {tuple(q.shape)}")
    if x.dtype not in _DTYPES or q.dtype != torch.int8 or x.device.type != "cpu" or q.device.type != "cpu":
        raise ValueError(f"int8_matmul: x must be float32/bfloat16 and q int8, both on the CPU, got "
                         f"{x.dtype} on {x.device} and {q.dtype} on {q.device}")
    if scales.shape != (q.shape[0],) or scales.dtype != torch.float32 or scales.device.type != "cpu":
        raise ValueError(f"int8_matmul: scales must be a float32 CPU tensor of shape ({q.shape[0]},), got "
                         f"{scales.dtype} {tuple(scales.shape)} on {scales.device}")
    library = _library(isa)
    if library is None:
        raise RuntimeError(f"int8_matmul: the native kernel is unavailable: {load_native('int8_matvec', isa).message}")
    x, q, scales = x.contiguous(), q.contiguous(), scales.contiguous()
    out = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype)
    status = library.int8_matvec(x.data_ptr(), int(x.dtype == torch.bfloat16), q.data_ptr(), scales.data_ptr(),
                                 out.data_ptr(), int(out.dtype == torch.bfloat16), x.shape[0], q.shape[0],
                                 q.shape[1], torch.get_num_threads())
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

__all__ = ["int8_matmul", "int8_native_available", "int8_native_supports", "widen_into"]
