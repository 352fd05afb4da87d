"""Key/value caches for incremental decoding, and the protocol they share.

Every cache answers ``update(positions, k, v) -> (keys, values, k_positions)``: the new keys and
values ``(B, Hkv, N, D)`` of the tokens at absolute ``positions`` ``(N,)`` (int64, shared by the
batch) are stored, and the call returns every key and value a query of this step may need, with
the absolute position of each, ``k_positions`` ``(Nk,)``. A key keeps its original position; the
attention pattern of the layer decides which of them a query sees. :data:`EMPTY` (-1) marks a
slot that holds no token yet: attention hides it from every query (see
:func:`attnkit.kernels.decode.decode_attention` and :class:`attnkit.nn.MultiHeadAttention`).

Shapes never depend on how many tokens were written, so a one-token decoding step has the same
shapes at every position (what ``torch.compile`` and CUDA graphs need), and ``update`` reads no
value back to the host. ``positions`` must lie in the cache's range (``[0, max_len)`` for
:class:`KVCache`): the caller's contract, checked where positions are made (``generate`` checks
the prompt plus new tokens once; :class:`~attnkit.nn.MultiHeadAttention` checks the positions it
makes itself); an index out of range fails inside torch's ``index_copy_``.

The caches here: :class:`KVCache` (static, slot ``p`` holds position ``p``, sized to the prompt
plus the new tokens) and :class:`~attnkit.nn.RollingKVCache` (a ring of the last ``window``
tokens). Before this protocol, ``KVCache.update(k, v)`` appended after ``cache.length``; its
callers now pass the positions (``cache.update(torch.arange(cache.length, cache.length + n), k, v)``
reproduces the old call).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import positive_int

EMPTY = -1
"""The ``k_positions`` entry of a slot that holds no token."""


STATIC_INPUT_TYPE = "unguarded"


def mark_static_address(buffer: torch.Tensor) -> None:
    """What ``torch._dynamo.mark_static_address(buffer)`` does (it sets this attribute: a test
    checks that it still does), without importing ``torch._dynamo``: that import keeps about
    140 MiB resident, and a model that is never compiled has no use for it."""
    buffer._dynamo_static_input_type = STATIC_INPUT_TYPE


class SlotCache(nn.Module):
    """Preallocated slots of one attention layer: ``keys``/``values`` ``(B, Hkv, slots, D)`` and
    ``positions (slots,)``, the absolute position held by each slot (:data:`EMPTY` when none).

    Subclasses choose the slot of each position and what ``update`` returns. The buffers are
    marked static for ``torch.compile`` (their addresses never change, so CUDA graphs may
    capture steps that write them in place).
    """

    def __init__(self, owner: str, batch: int, n_kv_heads: int, slots: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 slots_name: str = "max_len") -> None:
        super().__init__()
        for name, value in (("batch", batch), ("n_kv_heads", n_kv_heads), (slots_name, slots), ("head_dim", head_dim)):
            positive_int(owner, name, value)
        self._owner = owner
        shape = (batch, n_kv_heads, slots, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("positions", torch.full((slots,), EMPTY, dtype=torch.long, device=device), persistent=False)
        for buffer in (self.keys, self.values, self.positions):
            mark_static_address(buffer)

    @property
    def length(self) -> int:
        """One past the largest position stored (0 when empty): the next position of a caller
        that decodes in order. Reads the buffer (a host sync on a GPU): for callers outside the
        decoding step."""
        return int(self.positions.max()) + 1

    @property
    def stored(self) -> int:
        """Slots that hold a token (reads the buffer, like :attr:`length`)."""
        return int((self.positions != EMPTY).sum())

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused; keys and values are zeroed)."""
        self.positions.fill_(EMPTY)
        self.keys.zero_()
        self.values.zero_()

    def check_new(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise ValueError unless ``k`` and ``v`` are ``(B, Hkv, n, D)`` of this cache."""
        if k.shape != v.shape or k.shape[:2] != self.keys.shape[:2] or k.shape[3] != self.keys.shape[3]:
            raise ValueError(
                f"{self._owner}.update: k {tuple(k.shape)} and v {tuple(v.shape)} must be "
                f"(batch={self.keys.shape[0]}, n_kv_heads={self.keys.shape[1]}, n, head_dim={self.keys.shape[3]})"
            )


class KVCache(SlotCache):
    """The static cache: slot ``p`` holds the token at position ``p``, for ``p < max_len``.

    Args:
        batch: batch size ``B``.
        n_kv_heads: key/value heads ``Hkv`` (GQA/MQA caches store only these).
        max_len: capacity in positions (``generate`` sizes it to the prompt plus the new tokens).
        head_dim: ``D``.
    :meth:`update` returns the whole buffers ``(B, Hkv, max_len, D)`` and ``positions`` (slots not
    written yet are :data:`EMPTY`), so shapes stay fixed from step to step (gpt-fast style).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__("KVCache", batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def update(self, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, Hkv, N, D)`` at ``positions (N,)``; return the buffers
        ``keys``, ``values`` ``(B, Hkv, max_len, D)`` and ``positions (max_len,)``.

        Raises ValueError when the shapes differ from the cache's, and RuntimeError when ``k`` or
        ``v`` require grad under grad mode (the buffers are written in place: inference only).
        """
        self.check_new(k, v)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing in place into buffers that earlier steps saved for backward would break
            # autograd (and grow one graph across all steps): the cache is for inference.
            raise RuntimeError(
                "KVCache.update: the cache is for inference; decode under torch.no_grad() "
                "or torch.inference_mode()"
            )
        self.keys.index_copy_(2, positions, k.to(self.keys.dtype))
        self.values.index_copy_(2, positions, v.to(self.values.dtype))
        self.positions.index_copy_(0, positions, positions)
        return self.keys, self.values, self.positions
