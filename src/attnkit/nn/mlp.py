"""Gated feed-forward blocks: Llama's SwiGLU ``down(silu(gate(x)) * up(x))`` and Gemma's GeGLU
``down(gelu_tanh(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import positive_int


class SwiGLU(nn.Module):
    """Gated feed-forward (Shazeer, 2020) with SiLU gate, no biases.

    Args:
        dim: model width ``C``.
        hidden_dim: inner width ``F`` (Llama 3.1 8B: 14336).
    Parameters: ``3 * C * F`` in ``gate_proj (F, C)``, ``up_proj (F, C)``, ``down_proj (C, F)``.
    Shapes: ``x (..., C) -> (..., C)``.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            positive_int(type(self).__name__, name, value)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(SwiGLU):
    """Gated feed-forward with the tanh approximation of GELU as gate (Gemma), no biases.

    Same parameters and shapes as :class:`SwiGLU`: ``gate_proj (F, C)``, ``up_proj (F, C)``,
    ``down_proj (C, F)``; ``x (..., C) -> (..., C)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
