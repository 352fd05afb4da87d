"""GGUF quantized weights kept quantized: layers that replace ``nn.Linear`` and ``nn.Embedding``.

A GGUF file stores most weights of a model in block formats of 4.5 to 8.5 bits per weight
(:data:`~attnkit.kernels.quant_native.FORMATS`). :class:`QuantizedLinear` and
:class:`QuantizedEmbedding` keep those blocks (in the kernels' layout, made once at load:
:func:`~attnkit.kernels.quant_native.to_kernel_layout`) and compute with them through the native
kernels, so a decoded token reads the file's bytes (about 1/7 of float32's, 2/7 of bfloat16's)
instead of a dequantized copy:

- ``QuantizedLinear(x)`` equals ``x @ W.T`` with ``W`` the dequantized weight, up to float32
  rounding (activations are float32; other float dtypes are computed in float32 and rounded
  back);
- ``QuantizedEmbedding(ids)`` returns the dequantized rows of ``ids``, bit for bit the float32
  values the ``gguf`` package gives (so an embedding of a quantized model equals that of the
  float32 model it dequantizes to); :meth:`QuantizedEmbedding.as_linear` shares its blocks with an
  output layer (a tied head, as SmolLM2's and Gemma 3's).

Both call the kernels through :mod:`~attnkit.kernels.quant_ops`, as torch custom ops while
``torch.compile`` traces them (opaque calls in the graph) and directly otherwise.
:func:`quantized_linear_from_gguf` and :func:`quantized_embedding_from_gguf` make them from a
tensor of a parsed GGUF file, whatever the model family. The layers are for inference: no
gradients, and their state dict holds the blocks in the kernels' layout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels.quant_native import ACTIVATIONS, FORMATS, QuantFormat, quant_dequantize, quant_format, to_kernel_layout
from ..kernels.quant_ops import quant_embedding, quant_linear

QUANTIZED_TYPE_NAMES = tuple(FORMATS)
"""GGUF tensor types that stay quantized (the others are dequantized to float at load)."""
DEFAULT_ACTIVATIONS = "float32"
"""How a new :class:`QuantizedLinear` takes its activations in decoding (see
:func:`set_quant_activations`)."""


def _checked_blocks(where: str, blocks: torch.Tensor, fmt: QuantFormat) -> int:
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % fmt.block_bytes:
        raise ValueError(f"{where}: blocks must be a 2-D uint8 tensor of whole {fmt.name} blocks "
                         f"({fmt.block_bytes} bytes each) per row, got {blocks.dtype} {tuple(blocks.shape)}")
    return fmt.in_features(blocks.shape[1])


class _QuantizedWeight(nn.Module):
    """A weight ``W (out, in)`` kept as the uint8 ``blocks (out, row_bytes)`` of GGUF format ``fmt``
    in the kernels' layout; kept by reference, not copied. ValueError for an unknown format or
    blocks that are not whole rows of it."""

    def __init__(self, blocks: torch.Tensor, fmt: str) -> None:
        super().__init__()
        self.fmt = quant_format(fmt).name
        self.in_features = _checked_blocks(type(self).__name__, blocks, FORMATS[self.fmt])
        self.out_features = blocks.shape[0]
        self.register_buffer("blocks", blocks)

    @classmethod
    def from_gguf_rows(cls, rows: torch.Tensor, fmt: str):
        """The layer of the file's rows ``rows (out, row_bytes)`` (uint8, GGUF layout)."""
        quant = quant_format(fmt)
        _checked_blocks(cls.__name__, rows, quant)
        return cls(to_kernel_layout(rows, quant).contiguous(), fmt)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight ``(out, in)`` (a new tensor)."""
        return quant_dequantize(self.blocks, FORMATS[self.fmt])


class QuantizedLinear(_QuantizedWeight):
    """``y = x @ W.T`` for a weight ``W (out, in)`` kept in a GGUF block format; ``x (..., in)``,
    ``y (..., out)`` in ``x``'s dtype (computed in float32).

    Args:
        blocks: ``(out, row_bytes)`` uint8 CPU tensor in the kernels' layout (made by
            :meth:`from_gguf_rows` from the file's rows); kept by reference, not copied.
        fmt: the format's name (``"Q4_1"``, ...), one of :data:`QUANTIZED_TYPE_NAMES`.

    Raises:
        ValueError: for an unknown format or blocks that are not whole rows of it.
    """

    activations: str = DEFAULT_ACTIVATIONS
    """``"float32"`` or ``"int8"``: how the native kernel takes ``x`` (see :func:`set_quant_activations`)."""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, "
                f"activations={self.activations}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: x has {x.shape[-1]} features, the layer takes {self.in_features}")
        rows = x.reshape(-1, self.in_features).float()
        if torch.compiler.is_compiling():
            out = torch.ops.attnkit.quant_linear(rows, self.blocks, self.fmt, self.activations)
        else:
            out = quant_linear(rows, self.blocks, self.fmt, self.activations)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class QuantizedEmbedding(_QuantizedWeight):
    """A lookup of rows of an embedding ``W (vocab, dim)`` kept in a GGUF block format:
    ``ids (...)`` integer -> ``(..., dim)`` float32. Args and errors as :class:`QuantizedLinear`
    (``out_features`` is the vocabulary, ``in_features`` the embedding width)."""

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, fmt={self.fmt}"

    def as_linear(self) -> QuantizedLinear:
        """A :class:`QuantizedLinear` ``(dim -> vocab)`` on the same blocks (a tied output layer)."""
        return QuantizedLinear(self.blocks, self.fmt)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"QuantizedEmbedding: ids must be integers, got {ids.dtype}")
        if torch.compiler.is_compiling():
            return torch.ops.attnkit.quant_embedding(ids, self.blocks, self.fmt)
        return quant_embedding(ids, self.blocks, self.fmt)



def install_quantized(model: nn.Module, kept: dict[str, nn.Module], tie_embeddings: bool) -> None:
    """Put the quantized layers of ``kept`` (named by their parameter, ``"...weight"``) in place of
    ``model``'s modules of those names; with ``tie_embeddings`` and a quantized ``embed_tokens``,
    the output head shares the embedding's blocks (``model.lm_head``)."""
    for name, layer in kept.items():
        owner, _, attribute = name.removesuffix(".weight").rpartition(".")
        setattr(model.get_submodule(owner), attribute, layer)
    if tie_embeddings and isinstance(model.embed_tokens, QuantizedEmbedding):
        model.lm_head = model.embed_tokens.as_linear()

def gguf_rows(tensor) -> tuple[torch.Tensor, str]:
    """``(rows, format name)`` of a quantized tensor of a parsed GGUF file (a tensor of
    :func:`~attnkit.models.gguf_file.open_gguf`'s header, or of a ``gguf`` reader): the file's
    blocks as a ``(out, row_bytes)`` uint8 tensor of its own (a reader's memory map is read-only).
    ValueError for a type that does not stay quantized."""
    kind = tensor.tensor_type.name
    if kind not in FORMATS:
        raise ValueError(f"tensor {tensor.name} has type {kind}; quantized layers take "
                         f"{', '.join(QUANTIZED_TYPE_NAMES)}")
    data = np.asarray(tensor.data)
    return torch.from_numpy(data.reshape(data.shape[0], -1).copy()), kind


def quantized_linear_from_gguf(tensor) -> QuantizedLinear:
    """A :class:`QuantizedLinear` of a GGUF tensor ``(out, in)`` of one of the quantized types."""
    rows, kind = gguf_rows(tensor)
    return QuantizedLinear.from_gguf_rows(rows, kind)


def quantized_embedding_from_gguf(tensor) -> QuantizedEmbedding:
    """A :class:`QuantizedEmbedding` of a GGUF tensor ``(vocab, dim)`` of one of the quantized types."""
    rows, kind = gguf_rows(tensor)
    return QuantizedEmbedding.from_gguf_rows(rows, kind)


def set_quant_activations(model: nn.Module, activations: str) -> nn.Module:
    """Set how every :class:`QuantizedLinear` of ``model`` multiplies in decoding (up to
    :data:`~attnkit.kernels.quant_ops.NATIVE_ROWS` rows): ``"float32"``, exact up to float32
    rounding, or ``"int8"``, activations quantized to int8 per block of 32 and integer dot products
    (llama.cpp's method; error bound in :func:`~attnkit.kernels.quant_native.quant_matmul`).
    Returns ``model``; ValueError for another value."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.activations = activations
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds layers with GGUF quantized weights."""
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


__all__ = ["DEFAULT_ACTIVATIONS", "QUANTIZED_TYPE_NAMES", "QuantizedEmbedding", "QuantizedLinear", "gguf_rows", "install_quantized",
           "is_quantized", "quantized_embedding_from_gguf", "quantized_linear_from_gguf", "set_quant_activations"]
