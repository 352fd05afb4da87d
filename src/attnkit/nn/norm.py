"""Root-mean-square layer normalisation (Zhang & Sennrich, 2019), as Llama uses it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2, -1) + eps) * weight`` over the last dimension.

    The statistic is computed in float32 whatever the input dtype; the normalised value is cast
    back to the input dtype before the weight multiplies it (the order Llama checkpoints expect).

    Args:
        dim: width of the last dimension.
        eps: added to the mean square; must be positive.
    Shapes: ``x (..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"RMSNorm: dim must be a positive integer, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"RMSNorm: eps must be positive, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # torch's own norm: the same formula in float32, bit for bit, in one call from Python (faster)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class ZeroCenteredRMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2, -1) + eps) * (1 + weight)``: RMSNorm whose weight is stored as its
    offset from 1 (Gemma's convention; a zero weight is the identity scale).

    The statistic, the ``1 + weight`` and the product are computed in float32 (float64 for
    float64 inputs) and cast to the input dtype at the end (the order Gemma checkpoints expect;
    :class:`RMSNorm` casts before it multiplies).

    Args:
        dim: width of the last dimension.
        eps: added to the mean square; must be positive.
    Shapes: ``x (..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"ZeroCenteredRMSNorm: dim must be a positive integer, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"ZeroCenteredRMSNorm: eps must be positive, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(wide.dtype))).to(x.dtype)
