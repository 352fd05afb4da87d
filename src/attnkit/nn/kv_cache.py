"""Static key/value cache for incremental decoding.

The buffers are preallocated at ``(B, Hkv, max_len, D)`` and written in place, so shapes stay fixed
during generation (friendly to ``torch.compile``) and no memory is reallocated per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import positive_int


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer.

    Args:
        batch: batch size ``B``.
        n_kv_heads: key/value heads ``Hkv`` (GQA/MQA caches store only these).
        max_len: capacity in tokens.
        head_dim: ``D``.
    ``length`` counts the tokens written so far; :meth:`update` appends after them.
    """

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
            positive_int("KVCache", name, value)
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused)."""
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` ``(B, Hkv, n, D)``; return all cached keys and values
        ``(B, Hkv, length, D)`` (views of the buffers) including the new ones.

        Raises ValueError when the shapes differ from the cache's or the cache would overflow, and
        RuntimeError when called with tensors that require grad under grad mode (inference only).
        """
        if k.shape != v.shape or k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3]:
            raise ValueError(
                f"KVCache.update: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                f"(batch={self.keys.shape[0]}, n_kv_heads={self.keys.shape[1]}, n, head_dim={self.keys.shape[3]})"
            )
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing in place into buffers that earlier steps saved for backward would break
            # autograd (and grow one graph across all steps): the cache is for inference.
            raise RuntimeError(
                "KVCache.update: the cache is for inference; decode under torch.no_grad() "
                "or torch.inference_mode()"
            )
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache.update: {k.shape[2]} new tokens after {self.length} cached exceed max_len={self.max_len}"
            )
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]
