"""Sequence parallelism for an existing :class:`attnkit.nn.MultiHeadAttention`, applied from outside.

``RingMultiHeadAttention(layer)``, ``UlyssesMultiHeadAttention(layer)`` and
``HybridMultiHeadAttention(layer, grid)`` run ``layer``'s own projections and rotary hook on this
rank's shard of the sequence, with the shard's global positions, and the scheme's attention in
between; the layer's code and parameters are unchanged (the torchtitan habit). The three take the
same input and give the same output (rank ``w`` holds shard ``w`` in every scheme), so a model
switches scheme by name with :func:`sequence_parallel`. Parameter gradients are this rank's
share: sum them over the group (``all_reduce``) before the optimiser step, as the example in the
README does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn.attention import MultiHeadAttention
from .agreement import SCHEMES
from .comm import DEFAULT_TIMEOUT_S
from .grid import ParallelGrid
from .layouts import check_layout, shard_positions
from .ring import ring_attention
from .ulysses import hybrid_attention, ulysses_attention


class _ShardedAttention(nn.Module):
    """``layer`` over a sequence sharded across ``group`` in ``layout`` (``group``'s rank ``w``
    holds shard ``w``). Call: ``x (B, N/P, dim)``, this rank's shard -> ``(B, N/P, dim)``, this
    rank's shard of what ``layer`` gives on the full sequence (positions ``0 .. N-1``)."""

    def __init__(self, layer: MultiHeadAttention, group: Optional[dist.ProcessGroup], layout: str, timeout: float):
        super().__init__()
        if not isinstance(layer, MultiHeadAttention):
            raise TypeError(f"layer must be an attnkit MultiHeadAttention, got {type(layer).__name__}")
        self.layer, self.group, self.layout, self.timeout = layer, group, check_layout(layout), timeout

    def positions(self, shard_len: int, device: torch.device) -> torch.Tensor:
        """Global position ids ``(N/P,)`` of this rank's shard (what RoPE rotates by)."""
        world = dist.get_world_size(self.group)
        return shard_positions(shard_len * world, self.layout, dist.get_rank(self.group), world, device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != layer.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: x must be (batch, shard, {layer.dim}), got {got}")
        batch, n, _ = x.shape
        q, k, v = layer.project_qkv(x, self.positions(n, x.device))
        out = self.attend(q, k, v)
        return layer.o_proj(out.transpose(1, 2).reshape(batch, n, layer.n_heads * layer.head_dim))


class RingMultiHeadAttention(_ShardedAttention):
    """``layer`` with ring attention across ``group`` (default: the world); ``layout`` is how the
    sequence is sharded (``"contiguous"``, ``"zigzag"``, ``"striped"``); ``timeout`` the seconds a
    transfer may wait for a peer."""

    def __init__(self, layer: MultiHeadAttention, *, group: Optional[dist.ProcessGroup] = None,
                 layout: str = "zigzag", timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(layer, group, layout, timeout)

    def attend(self, q, k, v):
        return ring_attention(q, k, v, self.layer.pattern, group=self.group, layout=self.layout, timeout=self.timeout,
                              sinks=self.layer.sinks)


class UlyssesMultiHeadAttention(_ShardedAttention):
    """``layer`` with Ulysses attention across ``group`` (at most as many ranks as query heads);
    the other arguments as :class:`RingMultiHeadAttention`'s."""

    def __init__(self, layer: MultiHeadAttention, *, group: Optional[dist.ProcessGroup] = None,
                 layout: str = "zigzag", timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__(layer, group, layout, timeout)

    def attend(self, q, k, v):
        return ulysses_attention(q, k, v, self.layer.pattern, group=self.group, layout=self.layout,
                                 timeout=self.timeout, sinks=self.layer.sinks)


class HybridMultiHeadAttention(_ShardedAttention):
    """``layer`` with the hybrid scheme on ``grid`` (:func:`~.grid.make_grid`): Ulysses inside its
    Ulysses groups, a ring across them; the other arguments as :class:`RingMultiHeadAttention`'s."""

    def __init__(self, layer: MultiHeadAttention, grid: ParallelGrid, *, layout: str = "zigzag",
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not isinstance(grid, ParallelGrid):
            raise TypeError(f"grid must be a ParallelGrid (see make_grid), got {type(grid).__name__}")
        super().__init__(layer, grid.group, layout, timeout)
        self.grid = grid

    def attend(self, q, k, v):
        return hybrid_attention(q, k, v, self.layer.pattern, ulysses_group=self.grid.ulysses_group,
                                ring_group=self.grid.ring_group, layout=self.layout, timeout=self.timeout,
                                sinks=self.layer.sinks)


def sequence_parallel(
    layer: MultiHeadAttention, scheme: str, grid: ParallelGrid, *, layout: str = "zigzag",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> _ShardedAttention:
    """``layer`` sharded over ``grid.group`` by the scheme named ``scheme`` (``"ring"`` and
    ``"ulysses"`` use the whole group, ``"hybrid"`` the grid)."""
    if scheme == "ring":
        return RingMultiHeadAttention(layer, group=grid.group, layout=layout, timeout=timeout)
    if scheme == "ulysses":
        return UlyssesMultiHeadAttention(layer, group=grid.group, layout=layout, timeout=timeout)
    if scheme == "hybrid":
        return HybridMultiHeadAttention(layer, grid, layout=layout, timeout=timeout)
    raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")


__all__ = [
    "HybridMultiHeadAttention", "RingMultiHeadAttention", "SCHEMES", "UlyssesMultiHeadAttention",
    "sequence_parallel",
]
