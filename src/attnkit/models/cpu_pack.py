"""Pre-packed oneDNN weights for faster CPU inference of a :class:`~attnkit.models.llama.Llama`.

``torch.nn.functional.linear`` multiplies by a plain row-major weight; for one token at a time
(decoding) it reads bfloat16 weights at a fraction of the machine's memory bandwidth. oneDNN can
first reorder ("pack") a weight into the blocked layout its matrix-vector kernel reads best; the
values and dtype are unchanged, only their order in memory differs. :func:`pack_for_cpu` swaps
every linear layer (and the vocabulary head) of a model for such a packed copy.

The packed model is for inference only: no gradients, no ``state_dict`` round trip (save before
packing). Packing needs a torch built with oneDNN (``torch.backends.mkldnn.is_available()``).
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """``y = x @ W.T`` with ``W (out, in)`` held in oneDNN's packed layout; ``x (..., in)``.

    Args:
        weight: the dense ``(out, in)`` float32 or bfloat16 CPU weight to pack (it is copied).
        batch_hint: rows per call oneDNN optimises the layout for (1 = decoding).
    """

    def __init__(self, weight: torch.Tensor, batch_hint: int = 1) -> None:
        super().__init__()
        if weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"PackedLinear: weight must be a 2-D float32/bfloat16 CPU tensor, got "
                f"{weight.dtype} {tuple(weight.shape)} on {weight.device}"
            )
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype:
            raise ValueError(f"PackedLinear: x is {x.dtype} but the packed weight is {self.packed.dtype}")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def is_packed(model: nn.Module) -> bool:
    """Whether :func:`pack_for_cpu` has packed ``model``."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Replace, in place, each bias-free ``nn.Linear`` of a Llama ``model`` by a
    :class:`PackedLinear`; a tied model gets a packed copy of its embedding as ``lm_head``.
    Returns ``model``. Raises RuntimeError without oneDNN, ValueError off the CPU."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("pack_for_cpu: this torch build has no oneDNN (mkldnn) support")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, PackedLinear(child.weight))
    if model.lm_head is None:
        model.lm_head = PackedLinear(model.embed_tokens.weight)
    return model
