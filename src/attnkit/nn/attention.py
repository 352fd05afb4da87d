"""Multi-head attention with its own Q/K/V projections per head: MHA, GQA and MQA in one module."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..checks import boolean, check_scale, positive_int
from ..backends import BY_NAME
from ..functional import BACKENDS, attention
from ..patterns import Pattern, as_pattern, shared_band
from ..kernels.decode import decode_attention
from .kv_cache import KVCache, SlotCache
from .rolling_cache import RollingKVCache
from .sink_cache import SinkCache

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
        sinks: give each query head a learnable attention sink (as in gpt-oss): ``self.sinks``,
            a ``(Hq,)`` parameter (zeros at first) of logits that join every softmax denominator
            and contribute no value (see :func:`attnkit.attention`). Off by default
            (``self.sinks`` is None).

    Parameters: ``dim * D * (Hq + 2 * Hkv) + Hq * D * dim``, plus ``D * (Hq + 2 * Hkv) + dim``
    biases when ``bias=True``, ``Hq`` with ``sinks`` and the norms' parameters with ``qk_norm``.
    Projections are named ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
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
        sinks: bool = False,
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
        with_sinks = boolean("MultiHeadAttention", "sinks", sinks)
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if with_sinks else None

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
        band = shared_band(self.pattern)
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
        self, x: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries ``(B, Hq, N, D)``, keys and values ``(B, Hkv, N, D)``, normalised by
        ``q_norm``/``k_norm`` and rotated by ``rope`` when set (positions default to
        ``0 .. N - 1``)."""
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            if positions is None:
                positions = torch.arange(n, device=x.device)
            q, k = self.rope(q, k, positions)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[SlotCache] = None,
        key_mask: Optional[torch.Tensor] = None,
        cache_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x (B, N, dim) -> (B, N, dim)``.

        ``positions`` ``(N,)`` or ``(B, N)`` go to the rope hook (default ``0 .. N - 1``, or with a
        cache the next N positions after ``cache.length``).

        With a ``cache`` (:class:`KVCache`, :class:`RollingKVCache`, :class:`SinkCache`, anything with the cache
        protocol of :mod:`attnkit.nn.kv_cache`), the new keys and values are stored at
        ``cache_positions`` ``(N,)`` (default: ``positions`` when they are one row for the
        batch) and the queries attend to every stored key that the pattern, evaluated at those
        absolute positions, lets them see. One new token per row (decoding) takes
        :func:`~attnkit.kernels.decode.decode_attention`, which needs no plan and reads nothing
        back to the host; several (a prompt) take :func:`attnkit.attention` over the stored keys
        in position order (also one token when the layer has sinks). A :class:`RollingKVCache`
        needs a causal sliding window, a :class:`SinkCache` its ``sink_pattern`` (or a window).

        ``key_mask`` bool, True = a real token, hides padding keys per row (batches of prompts
        with different lengths): without a cache ``(B, N)``, one entry per key; with a cache
        ``(B, P)``, one entry per cache position (``P`` beyond the newest position). It is the
        ``key_padding_mask`` of :func:`attnkit.attention` (a backend that takes it runs the call:
        the layer's own, else ``auto``'s choice).

        Raises ValueError for an ``x`` of the wrong shape, per-row ``positions`` with a cache but
        no ``cache_positions``, or default positions beyond a :class:`KVCache`'s ``max_len``.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"MultiHeadAttention: x must be (batch, seq, {self.dim}), got {got}")
        batch, n, _ = x.shape
        if cache is None:
            q, k, v = self.project_qkv(x, positions)
            out = attention(q, k, v, self.pattern, scale=self.scale, backend=self._backend(key_mask is not None, False),
                            key_padding_mask=key_mask, sinks=self.sinks)  # (B, Hq, N, D)
        else:
            if isinstance(cache, (RollingKVCache, SinkCache)):  # caches that keep only some keys
                cache.check_pattern(self.pattern)
            slots = self._cache_positions(cache, n, positions, cache_positions, x.device)
            q, k, v = self.project_qkv(x, slots if positions is None else positions)
            keys, values, k_positions = cache.update(slots, k, v)
            mask = None if key_mask is None else key_mask[:, k_positions.clamp(min=0)]
            if n == 1 and self.sinks is None:  # the decode kernel has no sinks: attention() below has
                out = decode_attention(q, keys, values, self.pattern, slots, k_positions, key_padding_mask=mask,
                                       scale=self.scale)
            else:
                out = self._attend_stored(q, keys, values, slots, k_positions, mask)
        out = out.transpose(1, 2).reshape(batch, n, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def _cache_positions(self, cache: SlotCache, n: int, positions: Optional[torch.Tensor],
                         cache_positions: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """``(N,)`` positions where the new keys go: given, the rope positions when they are one
        row, or the next N after the cache's newest (read from the cache: a caller that decodes
        step by step passes them instead)."""
        if cache_positions is not None:
            return cache_positions
        if positions is not None:
            if positions.dim() != 1:
                raise ValueError(
                    f"MultiHeadAttention: positions {tuple(positions.shape)} differ per row; give the "
                    "cache_positions (N,) where the new keys go"
                )
            return positions
        start = cache.length
        if isinstance(cache, KVCache) and start + n > cache.max_len:
            raise ValueError(
                f"MultiHeadAttention: {n} new tokens after {start} cached exceed max_len={cache.max_len} of the cache"
            )
        return torch.arange(start, start + n, device=device)

    def _attend_stored(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_positions: torch.Tensor,
                       k_positions: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Several new queries (a prompt, a chunk) over the stored keys, through :func:`attention`.

        The stored keys are taken in position order. When they are positions ``first .. last``
        and the queries the newest of them, the call keeps attention's default (bottom-right)
        alignment, and with it the plans of ``auto`` (causal SDPA, bands), provided the keys start
        at 0 or the pattern is a band (which depends on ``i - j`` only); otherwise the positions
        are passed explicitly.
        """
        stored = k_positions >= 0
        n_k = int(stored.sum())
        in_place = torch.arange(n_k, device=k_positions.device)
        if not torch.equal(k_positions[:n_k], in_place):  # not a static cache filled from 0: sort
            order = k_positions.masked_fill(~stored, torch.iinfo(torch.long).max).argsort()[:n_k]
            keys, values, k_positions = keys[:, :, order], values[:, :, order], k_positions[order]
            key_mask = None if key_mask is None else key_mask[:, order]
        else:
            keys, values, k_positions = keys[:, :, :n_k], values[:, :, :n_k], k_positions[:n_k]
            key_mask = None if key_mask is None else key_mask[:, :n_k]
        first, n_q = int(k_positions[0]), q_positions.shape[0]
        aligned = (torch.equal(k_positions, in_place + first)
                   and torch.equal(q_positions, in_place[n_k - n_q:] + first)
                   and (first == 0 or shared_band(self.pattern) is not None))
        if aligned:
            return attention(q, keys, values, self.pattern, scale=self.scale,
                             backend=self._backend(key_mask is not None, False), key_padding_mask=key_mask,
                             sinks=self.sinks)
        return attention(q, keys, values, self.pattern, scale=self.scale,
                         backend=self._backend(key_mask is not None, True),
                         q_positions=q_positions, k_positions=k_positions, key_padding_mask=key_mask,
                         sinks=self.sinks)

    def _backend(self, padding: bool, positions: bool) -> str:
        """The layer's backend, or ``auto`` when the call has padding or positions it does not take
        (``auto`` then picks one that does: SDPA with a mask)."""
        runner = BY_NAME.get(self.backend)
        if runner is None or (padding and not runner.takes_padding) or (positions and not runner.takes_positions):
            return "auto"
        return self.backend
