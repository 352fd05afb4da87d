"""Gated feed-forward blocks: Llama's SwiGLU ``down(silu(gate(x)) * up(x))`` and Gemma's GeGLU
``down(gelu_tanh(gate(x)) * up(x))``."""

from __future__ import annotations

from typing import Callable, Optional

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
        # Optional x -> cat(gate_proj(x), up_proj(x), -1) in one call, set by a model that
        # concatenated the two weights (attnkit.models.fuse); not a submodule: same weights.
        self.fused_gate_up: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_proj(x), up_proj(x))``, each ``(..., F)``."""
        if self.fused_gate_up is not None:
            return self.fused_gate_up(x).chunk(2, dim=-1)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class GeGLU(SwiGLU):
    """Gated feed-forward with the tanh approximation of GELU as gate (Gemma), no biases.

    Same parameters and shapes as :class:`SwiGLU`: ``gate_proj (F, C)``, ``up_proj (F, C)``,
    ``down_proj (C, F)``; ``x (..., C) -> (..., C)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)
