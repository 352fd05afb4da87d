"""Rolling key/value cache for sliding-window decoding: memory for ``window`` tokens, not the whole text.

A causal sliding window of ``size`` keys never looks further back than ``size - 1`` tokens, so a
decoder with ``SlidingWindow(size)`` attention only has to keep the most recent tokens. The cache
is a ring of ``window`` slots: position ``p`` lives in slot ``p % window``. ``update`` returns
the ring as it was before the call followed by the new tokens, each key with its absolute
position (the cache protocol of :mod:`attnkit.nn.kv_cache`), so the window pattern masks exactly
what it would mask over the whole sequence; one new token gives ``window + 1`` keys at every step.
"""

from __future__ import annotations

import math

import torch

from ..patterns import Pattern, shared_band
from .kv_cache import SlotCache


class RollingKVCache(SlotCache):
    """The last ``window`` keys and values of one attention layer.

    Args:
        batch: batch size ``B``.
        n_kv_heads: key/value heads ``Hkv``.
        window: tokens kept; enough for any causal band of at most ``window`` keys
            (``SlidingWindow(size)`` with ``size <= window``).
        head_dim: ``D``.
    :attr:`length` is one past the newest position seen (the next position of a caller decoding in
    order); at most ``window`` tokens are stored. The cached keys are constants for autograd: the
    new keys and values of a call keep their gradients, the stored ones have none.
    """

    def __init__(self, batch: int, n_kv_heads: int, window: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__("RollingKVCache", batch, n_kv_heads, window, head_dim, dtype=dtype, device=device,
                         slots_name="window")

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ValueError unless ``pattern`` is a causal band of at most ``window`` keys (for
        example ``SlidingWindow(size)`` with ``size <= window``): others need older tokens."""
        band = shared_band(pattern)
        if band is None or band[0] < 0 or not math.isfinite(band[1]) or band[1] + 1 > self.window:
            raise ValueError(
                f"RollingKVCache: pattern must be a causal sliding window of at most {self.window} keys "
                f"(SlidingWindow(size) with size <= {self.window}), got {pattern!r}"
            )

    def update(self, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, Hkv, N, D)`` of ``positions (N,)`` (the last ``window`` of them
        stay); return the ring before the call followed by the new tokens: keys and values
        ``(B, Hkv, window + N, D)`` (new tensors: later updates do not change them) and their
        positions ``(window + N,)`` (:data:`~attnkit.nn.kv_cache.EMPTY` for empty slots).

        Raises ValueError when the shapes differ from the cache's.
        """
        self.check_new(k, v)
        k, v = k.to(self.keys.dtype), v.to(self.values.dtype)
        keys = torch.cat([self.keys, k], dim=2)
        values = torch.cat([self.values, v], dim=2)
        k_positions = torch.cat([self.positions, positions])
        kept = min(k.shape[2], self.window)  # the newest tokens: index_copy_ must not see a slot twice
        newest = positions[-kept:]
        slots = newest % self.window
        self.keys.index_copy_(2, slots, k[:, :, -kept:].detach())
        self.values.index_copy_(2, slots, v[:, :, -kept:].detach())
        self.positions.index_copy_(0, slots, newest)
        return keys, values, k_positions
