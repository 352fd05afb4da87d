"""``Gemma3Config``: the numbers that define a Gemma 3 text decoder, validated, with the published presets.

Gemma 3 interleaves two kinds of attention layer: five of every six attend through a causal
sliding window (``SlidingWindow(sliding_window)``: the ``sliding_window`` most recent keys, the
token itself included), the sixth to every earlier key (``Causal()``). The two kinds rotate their
keys with different RoPE bases (local 10,000, global 1,000,000; the global one is stretched
linearly from 4B up). The config holds the kind of every layer (``layer_types``, Hugging Face's
names), and :attr:`Gemma3Config.layer_patterns` turns them into the patterns the model and its
caches follow.

Gemma 3's own constants, which a GGUF file does not carry, are stated once here:
:data:`GLOBAL_EVERY`, :data:`LOCAL_ROPE_THETA`, :data:`END_OF_TURN` and
:func:`published_query_scalar`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional

from ...checks import boolean, finite_real, positive_int
from ...nn.rope import LinearRopeScaling
from ...patterns import Causal, Pattern, SlidingWindow

SLIDING, FULL = "sliding_attention", "full_attention"
"""The two layer kinds, as Hugging Face's ``layer_types`` spells them."""

GLOBAL_EVERY = 6
"""Gemma 3's layer pattern: layer ``i`` (from 0) is global when ``(i + 1) % 6 == 0``, else a window layer."""

LOCAL_ROPE_THETA = 10_000.0
"""RoPE base of the window layers (GGUF files store only the global one)."""

END_OF_TURN = "<end_of_turn>"
"""The token that closes a chat turn; generation stops at it as at ``<eos>``."""


def published_query_scalar(dim: int, n_layers: int, n_heads: int, head_dim: int) -> float:
    """``query_pre_attn_scalar`` of the published Gemma 3 sizes (queries are scaled by its inverse
    square root): ``head_dim``, except the 27B (62 layers), published with ``dim / n_heads`` = 168.
    The rule llama.cpp applies to GGUF files, which do not store the value."""
    return float(dim // n_heads) if n_layers == 62 else float(head_dim)


def default_layer_types(n_layers: int) -> tuple[str, ...]:
    """Gemma 3's pattern over ``n_layers`` layers: five window layers, then one global, repeated."""
    return tuple(FULL if (i + 1) % GLOBAL_EVERY == 0 else SLIDING for i in range(n_layers))


@dataclass(frozen=True)
class Gemma3Config:
    """A Gemma 3 decoder: ``n_layers`` blocks of (1 + w)-RMSNorm -> attention with QK-norm and RoPE
    -> RMSNorm -> residual, RMSNorm -> GeGLU -> RMSNorm -> residual; then RMSNorm and the
    vocabulary head (the embedding matrix, tied). Embeddings are scaled by ``sqrt(dim)``.

    Args:
        dim: model width ``C``.
        n_layers: decoder blocks.
        n_heads: query heads ``Hq``.
        n_kv_heads: key/value heads ``Hkv`` (1: MQA); must divide ``n_heads``.
        head_dim: per-head width ``D`` (even; Gemma's is not ``dim / n_heads``).
        ffn_dim: GeGLU inner width.
        vocab_size: tokens in the vocabulary.
        sliding_window: keys a window layer sees, the token itself included.
        layer_types: ``"sliding_attention"`` or ``"full_attention"`` per layer; None for Gemma 3's
            pattern (:func:`default_layer_types`).
        rope_theta: RoPE base of the global layers.
        rope_local_theta: RoPE base of the window layers.
        rope_scaling: linear scaling of the global layers' RoPE, or None.
        query_pre_attn_scalar: queries are scaled by its ``-1/2`` power; None for ``head_dim``.
        norm_eps: RMSNorm epsilon.
        max_position_embeddings: longest context the model was trained for (generation refuses more).
        tie_embeddings: the head reuses the token embedding matrix (every published Gemma 3).
        bos_token_id, eos_token_ids: special tokens (``eos_token_ids`` stop generation by default).
    Derived: ``layer_types``, ``query_pre_attn_scalar`` (filled in on construction).
    Raises TypeError naming the field for a value of the wrong type, ValueError for any
    inconsistent value.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int = 262144
    sliding_window: int = 512
    layer_types: Optional[tuple[str, ...]] = None
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = LOCAL_ROPE_THETA
    rope_scaling: Optional[LinearRopeScaling] = None
    query_pre_attn_scalar: Optional[float] = None
    norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_embeddings: bool = True
    bos_token_id: Optional[int] = 2
    eos_token_ids: tuple[int, ...] = (1, 106)

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                     "sliding_window", "max_position_embeddings"):
            self._set(name, positive_int("Gemma3Config", name, getattr(self, name)))
        for name in ("rope_theta", "rope_local_theta", "norm_eps"):
            value = finite_real("Gemma3Config", name, getattr(self, name))
            if not value > 0:
                raise ValueError(f"Gemma3Config: {name} must be positive, got {value!r}")
            self._set(name, value)
        self._set("tie_embeddings", boolean("Gemma3Config", "tie_embeddings", self.tie_embeddings))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"Gemma3Config: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Gemma3Config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, LinearRopeScaling):
            raise TypeError(
                f"Gemma3Config: rope_scaling must be LinearRopeScaling or None, got {type(self.rope_scaling).__name__}"
            )
        scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        scalar = finite_real("Gemma3Config", "query_pre_attn_scalar", scalar)
        if not scalar > 0:
            raise ValueError(f"Gemma3Config: query_pre_attn_scalar must be positive, got {scalar!r}")
        self._set("query_pre_attn_scalar", scalar)
        self._set("layer_types", self._checked_layer_types())
        if isinstance(self.eos_token_ids, (str, bytes)) or not hasattr(self.eos_token_ids, "__iter__"):
            raise TypeError(f"Gemma3Config: eos_token_ids must be a sequence of token ids, got {self.eos_token_ids!r}")
        self._set("eos_token_ids", tuple(self._token_id("eos_token_ids", t) for t in self.eos_token_ids))
        if self.bos_token_id is not None:
            self._set("bos_token_id", self._token_id("bos_token_id", self.bos_token_id))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _checked_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is None:
            return default_layer_types(self.n_layers)
        if isinstance(self.layer_types, str) or not hasattr(self.layer_types, "__iter__"):
            raise TypeError(f"Gemma3Config: layer_types must be a sequence of {SLIDING!r} / {FULL!r}, "
                            f"got {self.layer_types!r}")
        kinds = tuple(self.layer_types)
        if len(kinds) != self.n_layers:
            raise ValueError(f"Gemma3Config: layer_types has {len(kinds)} entries for {self.n_layers} layers")
        bad = [k for k in kinds if k not in (SLIDING, FULL)]
        if bad:
            raise ValueError(f"Gemma3Config: layer_types entries must be {SLIDING!r} or {FULL!r}, got {bad[0]!r}")
        return kinds

    def _token_id(self, name: str, token: object) -> int:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < self.vocab_size:
            raise ValueError(f"Gemma3Config: {name} must be token ids below vocab_size, got {token!r}")
        return int(token)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def scale(self) -> float:
        """The multiplier of ``q . k``: ``query_pre_attn_scalar ** -0.5``."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar)

    @property
    def layer_windows(self) -> tuple[Optional[int], ...]:
        """Keys each layer sees at most: ``sliding_window`` for a window layer, None for a global one."""
        return tuple(self.sliding_window if kind == SLIDING else None for kind in self.layer_types)

    @property
    def layer_patterns(self) -> tuple[Pattern, ...]:
        """Each layer's attention pattern: ``SlidingWindow(sliding_window)`` or ``Causal()``."""
        return tuple(Causal() if w is None else SlidingWindow(w) for w in self.layer_windows)

    @classmethod
    def preset(cls, name: str, **overrides) -> "Gemma3Config":
        """A published configuration by name (see :data:`PRESETS`), optionally with fields replaced
        (``layer_types`` follows a changed ``n_layers`` unless given)."""
        if name not in PRESETS:
            raise ValueError(f"unknown Gemma 3 preset {name!r}; known presets: {', '.join(PRESETS)}")
        if "n_layers" in overrides and "layer_types" not in overrides:
            overrides["layer_types"] = None
        return replace(PRESETS[name], **overrides)


_LONG = dict(sliding_window=1024, max_position_embeddings=131072, rope_scaling=LinearRopeScaling(8.0),
             vocab_size=262208)
"""What the 4B, 12B and 27B share: a 1024-token window, 128k context with the global RoPE
stretched 8 times, and the multimodal checkpoints' vocabulary (image tokens included)."""

PRESETS: dict[str, Gemma3Config] = {
    "gemma3-270m": Gemma3Config(dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=2048),
    "gemma3-1b": Gemma3Config(dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, ffn_dim=6912),
    "gemma3-4b": Gemma3Config(dim=2560, n_layers=34, n_heads=8, n_kv_heads=4, head_dim=256, ffn_dim=10240, **_LONG),
    "gemma3-12b": Gemma3Config(dim=3840, n_layers=48, n_heads=16, n_kv_heads=8, head_dim=256, ffn_dim=15360,
                               **_LONG),
    "gemma3-27b": Gemma3Config(dim=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=21504,
                               query_pre_attn_scalar=168, **_LONG),
}
"""The published Gemma 3 text decoders (Hugging Face ``config.json`` of google/gemma-3-*): 270M and
1B with a 512-token window and 32k context, MQA; 4B, 12B and 27B with a 1024-token window, 128k
context and GQA."""
