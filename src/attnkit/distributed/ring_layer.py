"""Sequence parallelism for an existing :class:`attnkit.nn.MultiHeadAttention`, applied from outside.

``RingMultiHeadAttention(layer)`` runs ``layer``'s own projections and rotary hook on this rank's
shard of the sequence, with the shard's global positions, and ring attention in between; the
layer's code and parameters are unchanged (the torchtitan habit). Parameter gradients are this
rank's share: sum them over the group (``all_reduce``) before the optimiser step, as the example
in the README does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn.attention import MultiHeadAttention
from .comm import DEFAULT_TIMEOUT_S
from .layouts import check_layout, shard_positions
from .ring import ring_attention


class RingMultiHeadAttention(nn.Module):
    """``layer`` over a sequence sharded across ``group`` in ``layout``.

    Args:
        layer: the attention layer (its pattern, heads and rope hook are used as they are).
        group: process group of the ring (default: the world).
        layout: how the sequence is sharded (``"contiguous"``, ``"zigzag"``, ``"striped"``).
        timeout: seconds a transfer may wait for a peer.
    Call: ``x (B, N/P, dim)``, this rank's shard -> ``(B, N/P, dim)``, this rank's shard of what
    ``layer`` gives on the full sequence (positions ``0 .. N-1``).
    """

    def __init__(
        self,
        layer: MultiHeadAttention,
        *,
        group: Optional[dist.ProcessGroup] = None,
        layout: str = "zigzag",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if not isinstance(layer, MultiHeadAttention):
            raise TypeError(f"layer must be an attnkit MultiHeadAttention, got {type(layer).__name__}")
        self.layer, self.group, self.layout, self.timeout = layer, group, check_layout(layout), timeout

    def positions(self, shard_len: int, device: torch.device) -> torch.Tensor:
        """Global position ids ``(N/P,)`` of this rank's shard (what RoPE rotates by)."""
        world = dist.get_world_size(self.group)
        return shard_positions(shard_len * world, self.layout, dist.get_rank(self.group), world, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != layer.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"RingMultiHeadAttention: x must be (batch, shard, {layer.dim}), got {got}")
        batch, n, _ = x.shape
        q, k, v = layer.project_qkv(x, self.positions(n, x.device))
        out = ring_attention(q, k, v, layer.pattern, group=self.group, layout=self.layout, timeout=self.timeout)
        return layer.o_proj(out.transpose(1, 2).reshape(batch, n, layer.n_heads * layer.head_dim))
