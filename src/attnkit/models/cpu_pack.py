"""Pre-packed oneDNN weights for faster CPU inference of a :class:`~attnkit.models.llama.Llama`.

``torch.nn.functional.linear`` multiplies by a plain row-major weight; for one token at a time
(decoding) it reads bfloat16 weights at a fraction of the machine's memory bandwidth. oneDNN can
first reorder ("pack") a weight into the blocked layout its matrix-vector kernel reads best; the
values and dtype are unchanged, only their order in memory differs. :func:`pack_for_cpu` swaps
every linear layer (and the vocabulary head) of a model for such a packed copy.

The packed layout pays off for a few rows at a time (decoding); for many rows (a prompt's prefill)
the plain row-major product is faster, so each packed layer keeps a reference to its plain weight
and uses it above ``DENSE_ROWS`` rows. Memory: the packed copy comes on top of the plain weights.

The packed model is for inference only: no gradients, no ``state_dict`` round trip (save before
packing). Packing needs a torch built with oneDNN (``torch.backends.mkldnn.is_available()``).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

DENSE_ROWS = 16
"""Calls with more rows than this (prefill) use the plain weight; fewer (decoding) the packed one."""


class PackedLinear(nn.Module):
    """``y = x @ W.T`` with ``W (out, in)`` held in oneDNN's packed layout; ``x (..., in)``.

    Args:
        weight: the dense ``(out, in)`` float32 or bfloat16 CPU weight to pack (the packed copy is
            new; the plain weight is kept by reference for calls of many rows).
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
        self.weight = weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.packed.dtype:
            raise ValueError(f"PackedLinear: x is {x.dtype} but the packed weight is {self.packed.dtype}")
        if x.numel() > DENSE_ROWS * self.in_features:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def is_packed(model: nn.Module) -> bool:
    """Whether :func:`pack_for_cpu` has packed ``model``."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def packed_dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack ``dtype`` weights on this CPU. float32 packs everywhere oneDNN runs;
    bfloat16 needs AVX-512 (avx512bw) or AVX-NE-CONVERT, so it is tried on a small weight."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


def pack_for_cpu(model: nn.Module, *, note: Optional[Callable[[str], None]] = None) -> nn.Module:
    """Replace, in place, each bias-free ``nn.Linear`` of a Llama ``model`` by a
    :class:`PackedLinear`; a tied model gets a packed copy of its embedding as ``lm_head``.
    Returns ``model``.

    When this CPU cannot pack the model's dtype (bfloat16 without AVX-512 or AVX-NE-CONVERT) the
    model is left with its plain weights, which compute the same values, and ``note`` (default:
    ``warnings.warn``) is told why. Raises RuntimeError without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("pack_for_cpu: this torch build has no oneDNN (mkldnn) support")
    dtype = model.embed_tokens.weight.dtype
    if not packed_dtype_supported(dtype):
        message = (f"this CPU cannot pack {dtype} weights for oneDNN (it needs avx512bw or avx_ne_convert); "
                   "using the plain weights")
        (note or (lambda m: warnings.warn(m, RuntimeWarning, stacklevel=3)))(message)
        return model
    return replace_linears(model, PackedLinear)


def replace_linears(model: nn.Module, make: Callable[[torch.Tensor], nn.Module]) -> nn.Module:
    """Replace, in place, each bias-free ``nn.Linear`` of a Llama ``model`` by ``make(weight)``;
    a tied model gets ``make(embedding weight)`` as its ``lm_head``. Returns ``model``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, make(child.weight))
    if model.lm_head is None:
        model.lm_head = make(model.embed_tokens.weight)
    return model
