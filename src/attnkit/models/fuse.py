"""One quantized matrix call where a block makes several from the same input.

Each attention layer projects its input three times (``q_proj``, ``k_proj``, ``v_proj``) and
each gated MLP twice (``gate_proj``, ``up_proj``). When those weights are GGUF blocks of one
format (:class:`~attnkit.models.quant.QuantizedLinear`), :func:`fuse_quantized_projections`
concatenates their rows once, at load, into one weight per group, and gives the layer a
``fused_qkv`` / ``fused_gate_up`` callable on it (see :class:`attnkit.nn.MultiHeadAttention` and
:class:`attnkit.nn.mlp.SwiGLU`). A decoding step then makes 2 quantized calls per block for
those 5 products: fewer calls from Python, one pass over the input, and more rows for the
kernel's threads to share.

The concatenation costs no memory: each projection's ``blocks`` becomes a view of its rows of
the fused weight, so the originals are freed and the layers, their state dict and their
results are unchanged. The native kernel computes every output row on its own, so a fused
call gives the same values, bit for bit, as the separate calls.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..nn.attention import MultiHeadAttention
from ..nn.mlp import SwiGLU
from .quant import QuantizedLinear


def _fused(layers: Sequence[nn.Module]) -> Optional[QuantizedLinear]:
    """One :class:`QuantizedLinear` on the rows of ``layers`` stacked in order (each layer's
    ``blocks`` then views its rows), or None when they are not all quantized in one format."""
    if not all(isinstance(layer, QuantizedLinear) for layer in layers):
        return None
    if len({(layer.fmt, layer.blocks.shape[1]) for layer in layers}) != 1:
        return None
    fused = QuantizedLinear(torch.cat([layer.blocks for layer in layers]), layers[0].fmt)
    start = 0
    for layer in layers:
        rows = layer.out_features
        layer.blocks = fused.blocks[start:start + rows]
        start += rows
    return fused


class _FusedCall:
    """``x -> fused(x)`` in the activations mode of the first member layer (the mode
    :func:`~attnkit.models.quant.set_quant_activations` sets on the model's layers, which do not
    include the fused weight: it is not a submodule)."""

    def __init__(self, fused: QuantizedLinear, first: QuantizedLinear) -> None:
        self.fused, self.first = fused, first

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.fused.activations = self.first.activations
        return self.fused(x)


def fuse_quantized_projections(model: nn.Module) -> int:
    """Fuse the q/k/v projections of every attention layer of ``model`` and the gate/up
    projections of every gated MLP whose weights are quantized in one format (see the module
    docstring); returns how many groups were fused. Layers with float weights stay as they are."""
    count = 0
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            fused = _fused((module.q_proj, module.k_proj, module.v_proj))
            if fused is not None:
                module.fused_qkv = _FusedCall(fused, module.q_proj)  # not a submodule: no second state entry
                count += 1
        elif isinstance(module, SwiGLU):
            fused = _fused((module.gate_proj, module.up_proj))
            if fused is not None:
                module.fused_gate_up = _FusedCall(fused, module.gate_proj)
                count += 1
    return count


__all__ = ["fuse_quantized_projections"]
