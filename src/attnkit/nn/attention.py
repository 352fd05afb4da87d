"""Multi-head attention with its own Q/K/V projections per head: MHA, GQA and MQA in one module."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..checks import check_scale, positive_int
from ..backends import BY_NAME
from ..functional import BACKENDS, attention
from ..patterns import Pattern, as_pattern
from .kv_cache import KVCache
from .rolling_cache import RollingKVCache

RopeHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``rope(q, k, positions) -> (q, k)``: rotates q ``(B, Hq, N, D)`` and k ``(B, Hkv, N, D)`` by
their absolute ``positions`` ``(N,)`` or ``(B, N)``."""


def _positive(name: str, value: object) -> int:
    return positive_int("MultiHeadAttention", name, value)


class MultiHeadAttention(nn.Module):
    """The seed's multi-head attention: project, attend per head, concatenate, project back.

    Args:
        dim: model width ``C`` of the input ``x (B, N, C)``.
        n_heads: query heads ``Hq``.
        n_kv_heads: key/value heads ``Hkv``: None for MHA (``Hkv = Hq``), 1 for MQA, any divisor
            of ``n_heads`` for GQA. Query head ``h`` shares the K/V of head ``h // (Hq // Hkv)``.
        head_dim: per-head width ``D``; default ``dim // n_heads``.
        pattern: which keys each token may see (default Full; a decoder passes Causal()).
        bias: add biases to the four projections.
        rope: optional position hook ``rope(q, k, positions) -> (q, k)`` applied before attention.
        backend: attention backend (see :func:`attnkit.attention`).
        scale: multiplier of ``q . k`` (kept as ``self.scale``); None for ``1 / sqrt(head_dim)``.
        qk_norm: optional ``make_norm(head_dim) -> nn.Module``; each query and key head is then
            normalised by its own module (``q_norm``, ``k_norm``) after the projection and before
            ``rope`` (QK-norm, as in Gemma 3).

    Parameters: ``dim * D * (Hq + 2 * Hkv) + Hq * D * dim``, plus ``D * (Hq + 2 * Hkv) + dim``
    biases when ``bias=True`` and the norms' parameters with ``qk_norm``. Projections are named
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: Optional[int] = None,
        *,
        head_dim: Optional[int] = None,
        pattern: Optional[Pattern] = None,
        bias: bool = False,
        rope: Optional[RopeHook] = None,
        backend: str = "auto",
        scale: Optional[float] = None,
        qk_norm: Optional[Callable[[int], nn.Module]] = None,
    ) -> None:
        super().__init__()
        _positive("dim", dim)
        _positive("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _positive("n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})"
            )
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(
                    f"MultiHeadAttention: dim ({dim}) must be divisible by n_heads ({n_heads}) "
                    "unless head_dim is given"
                )
            head_dim = dim // n_heads
        _positive("head_dim", head_dim)
        if backend not in BACKENDS:
            raise ValueError(f"MultiHeadAttention: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.pattern = as_pattern(pattern)
        if self.pattern.n_heads is not None and self.pattern.n_heads != n_heads:
            raise ValueError(
                f"MultiHeadAttention: pattern is per-head for {self.pattern.n_heads} heads, "
                f"but n_heads is {n_heads}"
            )
        self.rope = rope
        self.backend = backend
        self.scale = None if scale is None else check_scale(scale, head_dim)
        self.q_norm = None if qk_norm is None else qk_norm(head_dim)
        self.k_norm = None if qk_norm is None else qk_norm(head_dim)
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)

    def make_cache(self, batch: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A static :class:`KVCache` sized for this layer."""
        weight = self.k_proj.weight
        return KVCache(
            batch, self.n_kv_heads, max_len, self.head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device,
        )

    def make_rolling_cache(self, batch: int, *, dtype=None, device=None) -> RollingKVCache:
        """A :class:`RollingKVCache` holding just the window of this layer's sliding-window pattern.

        Raises ValueError when the pattern is not a causal sliding window (``SlidingWindow(size)``).
        """
        band = self.pattern.band() if self.pattern.n_heads is None else None
        if band is None or band[0] < 0 or band[1] == float("inf"):
            raise ValueError(
                f"MultiHeadAttention.make_rolling_cache: the pattern must be a causal sliding window, got {self.pattern!r}"
            )
        weight = self.k_proj.weight
        return RollingKVCache(
            batch, self.n_kv_heads, int(band[1]) + 1, self.head_dim,
            dtype=dtype or weight.dtype, device=device or weight.device,
        )

    def project_qkv(
        self, x: torch.Tensor, positions: Optional[torch.Tensor] = None, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries ``(B, Hq, N, D)``, keys and values ``(B, Hkv, N, D)``, normalised by
        ``q_norm``/``k_norm`` and rotated by ``rope`` when set (positions default to
        ``start .. start + N - 1``)."""
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(start, start + n, device=x.device)
            q, k = self.rope(q, k, positions)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[KVCache | RollingKVCache] = None,
        key_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x (B, N, dim) -> (B, N, dim)``.

        With a ``cache``, the new keys/values are appended to it and the N new queries attend to
        everything cached (bottom-right alignment puts them at the newest positions); a
        :class:`RollingKVCache` keeps only the last tokens and needs a causal sliding window.
        ``positions`` ``(N,)`` or ``(B, N)`` go to the rope hook (default: the next N positions).
        ``key_mask`` ``(B, Nk)`` bool (True = a real token, ``Nk`` = keys after the cache update)
        hides padding keys per row, for batches of prompts with different lengths: it is the
        ``key_padding_mask`` of :func:`attnkit.attention` (a backend that takes it runs the call:
        the layer's own, else ``auto``'s choice). A mask over the whole text, longer than the keys
        a :class:`RollingKVCache` returns, is cut to its last ``Nk`` columns (those keys).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MultiHeadAttention: x must be (batch, seq, {self.dim}), got {got}")
        if isinstance(cache, RollingKVCache):
            cache.check_pattern(self.pattern)
        start = cache.length if cache is not None else 0
        q, k, v = self.project_qkv(x, positions, start)
        if cache is not None:
            k, v = cache.update(k, v)
        if key_mask is not None and isinstance(cache, RollingKVCache):
            key_mask = key_mask[:, -k.shape[2]:]
        backend = self.backend
        if key_mask is not None and backend != "auto" and not BY_NAME[backend].takes_padding:
            backend = "auto"  # the layer's backend takes no padding: one that does (SDPA with a mask)
        out = attention(q, k, v, self.pattern, scale=self.scale, backend=backend, key_padding_mask=key_mask)  # (B, Hq, N, D)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_heads * self.head_dim)
        return self.o_proj(out)
