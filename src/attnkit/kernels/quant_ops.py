"""The products a quantized layer needs, on the kernels of :mod:`.quant_native`, as torch custom ops.

- :func:`quant_linear` ``(x @ W.T)`` for any number of rows: up to :data:`NATIVE_ROWS` rows (decoding,
  short prompts) the native kernel multiplies by the blocks directly; more rows (a prefill, which
  is compute-bound) take tiles of :data:`TILE_BYTES` of rows of ``W``, dequantized by the native
  kernel into a reused float32 buffer, and multiply there with torch's matrix product. No
  dequantized copy of the whole weight is ever kept.
- :func:`quant_embedding`: the dequantized rows of chosen ids (an embedding lookup).

Both are registered as torch custom ops, ``torch.ops.attnkit.quant_linear`` and
``torch.ops.attnkit.quant_embedding``, with fake (meta) implementations, so that
``torch.compile(fullgraph=True)`` keeps each as one opaque call. Outside a compiled region the
layers call the Python functions directly, which skips the dispatcher's few microseconds per call.
"""

from __future__ import annotations

import threading

import torch

from .quant_native import FORMATS, quant_dequantize, quant_matmul

NATIVE_ROWS = 16
"""Rows up to which :func:`quant_linear` runs the native kernel; more rows go through dequantized
tiles and torch's matrix product."""
TILE_BYTES = 1 << 25
"""float32 bytes of weight rows dequantized at once for many rows (32 MiB: every linear layer of
SmolLM2 and Gemma 3 270M but the vocabulary head is one tile)."""
_scratch = threading.local()


def _tile_buffer(numel: int) -> torch.Tensor:
    """This thread's float32 buffer for dequantized tiles, at least ``numel`` elements."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch.buffer = torch.empty(numel)
    return buffer


def quant_linear(x: torch.Tensor, blocks: torch.Tensor, fmt: str, activations: str = "float32") -> torch.Tensor:
    """``x @ W.T`` for ``x (rows, in)`` float32 and ``W`` the ``(out, row_bytes)`` blocks of format
    ``fmt`` (kernel layout, see :func:`.quant_native.to_kernel_layout`); ``(rows, out)`` float32.

    Equal to ``x @ quant_dequantize(blocks, fmt).T`` up to float32 rounding on either path; with
    ``activations="int8"`` the native kernel's rows (up to :data:`NATIVE_ROWS`) quantize ``x`` to
    int8 per block of 32 first (see :func:`.quant_native.quant_matmul`), the tiles of more rows stay
    float32. Raises ValueError as :func:`.quant_native.quant_matmul`.
    """
    quant = FORMATS[fmt]
    if x.shape[0] <= NATIVE_ROWS:
        return quant_matmul(x, blocks, quant, activations=activations)
    out_features, in_features = blocks.shape[0], quant.in_features(blocks.shape[1])
    if x.dim() != 2 or x.shape[1] != in_features or x.dtype != torch.float32:
        return quant_matmul(x, blocks, quant)  # raises the error that names what is wrong
    tile = max(1, TILE_BYTES // (4 * in_features))
    if tile >= out_features:
        return x @ quant_dequantize(blocks, quant).T
    buffer = _tile_buffer(tile * in_features)
    out = torch.empty(x.shape[0], out_features)
    for start in range(0, out_features, tile):
        stop = min(start + tile, out_features)
        weight = buffer[: (stop - start) * in_features].view(stop - start, in_features)
        quant_dequantize(blocks[start:stop], quant, out=weight)
        out[:, start:stop] = x @ weight.T
    return out


def quant_embedding(ids: torch.Tensor, blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """``W[ids]`` as float32 ``(*ids.shape, in)`` for the blocks of format ``fmt``; IndexError for an
    id outside ``[0, out)``."""
    return quant_dequantize(blocks, FORMATS[fmt], ids)


@torch.library.custom_op("attnkit::quant_linear", mutates_args=())
def _quant_linear_op(x: torch.Tensor, blocks: torch.Tensor, fmt: str, activations: str) -> torch.Tensor:
    return quant_linear(x, blocks, fmt, activations)


@_quant_linear_op.register_fake
def _(x: torch.Tensor, blocks: torch.Tensor, fmt: str, activations: str) -> torch.Tensor:
    return x.new_empty(x.shape[0], blocks.shape[0])


@torch.library.custom_op("attnkit::quant_embedding", mutates_args=())
def _quant_embedding_op(ids: torch.Tensor, blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    return quant_embedding(ids, blocks, fmt)


@_quant_embedding_op.register_fake
def _(ids: torch.Tensor, blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    return blocks.new_empty(*ids.shape, FORMATS[fmt].in_features(blocks.shape[1]), dtype=torch.float32)


__all__ = ["NATIVE_ROWS", "TILE_BYTES", "quant_embedding", "quant_linear"]
