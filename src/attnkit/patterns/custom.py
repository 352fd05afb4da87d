"""Patterns written as any elementwise rule on positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .base import Pattern


@dataclass(frozen=True)
class Predicate(Pattern):
    """Any rule written as ``fn(i, j) -> BoolTensor`` on broadcasting int64 position tensors.

    This is FlexAttention's ``mask_mod`` idea without the batch and head arguments, e.g.
    ``Predicate(lambda i, j: (j <= i) & (j % 4 == 0))``. ``fn`` must be pure and elementwise.
    Query positions start at ``Nk - Nq``: they are negative when queries outnumber keys.
    """

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Predicate: fn must be callable, got {type(self.fn).__name__}")

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        result = self.fn(i, j)
        if not isinstance(result, torch.Tensor) or result.dtype != torch.bool:
            raise TypeError(
                f"Predicate: fn must return a bool tensor, got "
                f"{getattr(result, 'dtype', type(result).__name__)}"
            )
        shape = torch.broadcast_shapes(i.shape, j.shape)
        try:
            return result.expand(shape)
        except RuntimeError:
            raise TypeError(
                f"Predicate: fn must return a mask broadcastable to {tuple(shape)}, "
                f"got shape {tuple(result.shape)}"
            ) from None
