"""The StreamingLLM cache: the first ``n_sink`` tokens of a text plus a rolling window of the newest.

Attention concentrates on the first tokens of a text whatever they say (the "attention sink"
of StreamingLLM); a window cache that evicts them degrades, one that keeps them does not. The
cache holds ``n_sink`` fixed slots for positions ``0 .. n_sink - 1`` and a ring of ``window``
slots for the rest (position ``p`` in ring slot ``p % window``). Keys keep their original
positions: RoPE is applied once, when a key is made, and never re-applied, so attention over the
cache is exactly attention over the whole text restricted to the cache's pattern,
:func:`sink_pattern` (``j < n_sink`` or ``i - j < window``, causally). It follows the cache
protocol of :mod:`attnkit.nn.kv_cache`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import positive_int
from ..patterns import Pattern, Predicate, SlidingWindow, Union, shared_band
from .kv_cache import EMPTY, SlotCache


@dataclass(frozen=True)
class FirstKeys:
    """``fn(i, j)`` of a :class:`~attnkit.patterns.Predicate`: the first ``n`` positions, causally."""

    n: int

    def __call__(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (j < self.n) & (j <= i)


def sink_pattern(n_sink: int, window: int) -> Pattern:
    """What a query at position ``i`` sees through a :class:`SinkCache`: keys ``j <= i`` with
    ``j < n_sink`` or ``i - j < window`` (``SlidingWindow(window) | Predicate(FirstKeys(n_sink))``)."""
    positive_int("sink_pattern", "n_sink", n_sink)
    positive_int("sink_pattern", "window", window)
    return SlidingWindow(window) | Predicate(FirstKeys(n_sink))


class SinkCache(SlotCache):
    """The first ``n_sink`` keys and values of one attention layer, and the last ``window``.

    Args:
        batch: batch size ``B``.
        n_kv_heads: key/value heads ``Hkv``.
        n_sink: leading positions kept for good (StreamingLLM keeps 4).
        window: newest tokens kept besides them.
        head_dim: ``D``.
    The buffers hold ``n_sink + window + 1`` slots: one spare slot takes the tokens a call drops
    (a prompt longer than the window; its position stays :data:`~attnkit.nn.kv_cache.EMPTY`), so
    that ``update`` writes every token at once and reads nothing back to the host. The cached
    keys are constants for autograd, as in :class:`~attnkit.nn.RollingKVCache`.
    """

    def __init__(self, batch: int, n_kv_heads: int, n_sink: int, window: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        n_sink, window = positive_int("SinkCache", "n_sink", n_sink), positive_int("SinkCache", "window", window)
        super().__init__("SinkCache", batch, n_kv_heads, n_sink + window + 1, head_dim, dtype=dtype, device=device)
        self.n_sink, self.window = n_sink, window

    @property
    def pattern(self) -> Pattern:
        """The widest pattern this cache serves exactly: :func:`sink_pattern` of its sizes."""
        return sink_pattern(self.n_sink, self.window)

    def check_pattern(self, pattern: Pattern) -> None:
        """Raise ValueError unless ``pattern`` needs only keys this cache keeps: a causal sliding
        window of at most ``window`` keys, alone or united with ``Predicate(FirstKeys(k))`` for
        ``k <= n_sink`` (see :func:`sink_pattern`)."""
        window, first = pattern, None
        right = pattern.right if isinstance(pattern, Union) else None
        if isinstance(right, Predicate) and isinstance(right.fn, FirstKeys):
            window, first = pattern.left, right.fn.n
        band = shared_band(window)
        fits = band is not None and band[0] == 0 and band[1] + 1 <= self.window
        if not fits or (first is not None and first > self.n_sink):
            raise ValueError(
                f"SinkCache: pattern must be sink_pattern(k, w) with k <= {self.n_sink} and w <= {self.window} "
                f"(or SlidingWindow(w) alone), got {pattern!r}"
            )

    def update(self, positions: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` ``(B, Hkv, N, D)`` of increasing ``positions (N,)`` (those below
        ``n_sink``, and the newest ``window`` of the others, stay); return the slots before the
        call followed by the new tokens: keys and values ``(B, Hkv, n_sink + window + 1 + N, D)``
        (new tensors) and their positions (:data:`~attnkit.nn.kv_cache.EMPTY` for empty slots).

        Raises ValueError when the shapes differ from the cache's.
        """
        self.check_new(k, v)
        k, v = k.to(self.keys.dtype), v.to(self.values.dtype)
        keys = torch.cat([self.keys, k], dim=2)
        values = torch.cat([self.values, v], dim=2)
        k_positions = torch.cat([self.positions, positions])
        sink = positions < self.n_sink
        kept = sink | (positions > positions[-1] - self.window)  # distinct ring slots among these
        spare = self.n_sink + self.window
        slots = torch.where(sink, positions, self.n_sink + positions % self.window)
        slots = torch.where(kept, slots, spare)
        self.keys.index_copy_(2, slots, k.detach())
        self.values.index_copy_(2, slots, v.detach())
        self.positions.index_copy_(0, slots, torch.where(kept, positions, EMPTY))
        return keys, values, k_positions
