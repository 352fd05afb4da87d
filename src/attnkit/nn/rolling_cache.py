"""Rolling key/value cache for sliding-window decoding: memory for ``window`` tokens, not the whole text.

A causal sliding window of ``size`` keys never looks further back than ``size - 1`` tokens, so a
decoder with ``SlidingWindow(size)`` attention only has to keep the most recent tokens. The cache
is a ring buffer ``(B, Hkv, window, D)``: token ``t`` lives in slot ``t % window``. ``update``
returns the kept tokens in order followed by the new ones, so the new queries sit at the end
(bottom-right alignment) and the window pattern, which depends only on ``i - j``, masks exactly
what it would mask over the whole sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import positive_int
from ..patterns import Pattern


class RollingKVCache(nn.Module):
    """The last ``window`` keys and values of one attention layer.

    Args:
        batch: batch size ``B``.
        n_kv_heads: key/value heads ``Hkv``.
        window: tokens kept; enough for any causal band of at most ``window`` keys
            (``SlidingWindow(size)`` with ``size <= window``).
        head_dim: ``D``.
    ``length`` counts every token seen so far (the absolute position of the next token, which is
    what rotary embeddings need); at most ``window`` of them are stored. The cached keys are
    constants for autograd (as in :class:`~attnkit.nn.KVCache`).
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        window: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("window", window), ("head_dim", head_dim)):
            positive_int("RollingKVCache", name, value)
        shape = (batch, n_kv_heads, window, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    @property
    def stored(self) -> int:
        """Tokens held now: ``min(length, window)``."""
        return min(self.length, self.window)

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused)."""
        self.length = 0

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ValueError unless ``pattern`` is a causal band of at most ``window`` keys (for
        example ``SlidingWindow(size)`` with ``size <= window``): others need older tokens."""
        band = pattern.band() if pattern.n_heads is None else None
        if band is None or band[0] < 0 or not math.isfinite(band[1]) or band[1] + 1 > self.window:
            raise ValueError(
                f"RollingKVCache: pattern must be a causal sliding window of at most {self.window} keys "
                f"(SlidingWindow(size) with size <= {self.window}), got {pattern!r}"
            )

    def _ordered_slots(self) -> torch.Tensor:
        first = self.length - self.stored
        return torch.arange(first, self.length, device=self.keys.device) % self.window

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(B, Hkv, n, D)``; return the kept and the new keys and values in
        order, ``(B, Hkv, stored + n, D)`` (new tensors: later updates do not change them).

        Raises ValueError when the shapes differ from the cache's.
        """
        if k.shape != v.shape or k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3]:
            raise ValueError(
                f"RollingKVCache.update: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                f"(batch={self.keys.shape[0]}, n_kv_heads={self.keys.shape[1]}, n, head_dim={self.keys.shape[3]})"
            )
        slots = self._ordered_slots()
        keys = torch.cat([self.keys.index_select(2, slots), k.to(self.keys.dtype)], dim=2)
        values = torch.cat([self.values.index_select(2, slots), v.to(self.values.dtype)], dim=2)
        n_new = k.shape[2]
        kept = min(n_new, self.window)
        new_slots = torch.arange(self.length + n_new - kept, self.length + n_new, device=self.keys.device) % self.window
        self.keys.index_copy_(2, new_slots, k[:, :, n_new - kept :].detach().to(self.keys.dtype))
        self.values.index_copy_(2, new_slots, v[:, :, n_new - kept :].detach().to(self.values.dtype))
        self.length += n_new
        return keys, values
