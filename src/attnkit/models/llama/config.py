"""``LlamaConfig``: the numbers that define a Llama 3.1 / 3.2 decoder, validated, with presets."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Optional

from ...nn.rope import Llama3RopeScaling
from ...checks import boolean, finite_real, positive_int
from ...patterns import Pattern
from ..checkpoint import bounded_size


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama 3 decoder: ``n_layers`` blocks of RMSNorm -> GQA attention with RoPE -> residual,
    RMSNorm -> SwiGLU -> residual; then RMSNorm and the vocabulary head.

    Args:
        dim: model width ``C``.
        n_layers: decoder blocks.
        n_heads: query heads ``Hq``.
        n_kv_heads: key/value heads ``Hkv`` (default ``n_heads``: MHA; 1: MQA); must divide ``n_heads``.
        ffn_dim: SwiGLU inner width.
        vocab_size: tokens in the vocabulary.
        head_dim: per-head width; derived as ``dim // n_heads`` when None (then ``dim`` must be
            divisible by ``n_heads``).
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: Llama 3.1 frequency scaling, or None for plain RoPE.
        max_position_embeddings: longest context the model was trained for (generation refuses more).
        tie_embeddings: the head reuses the token embedding matrix.
        bos_token_id, eos_token_ids: special tokens (``eos_token_ids`` stop generation by default).
        layer_patterns: optional attention pattern per layer (``None`` entries, or no tuple at all,
            mean causal); e.g. ``SlidingWindow(4096)`` on some layers.
    Derived: ``head_dim``, ``n_kv_heads`` (filled in on construction, so ``dataclasses.replace``
    keeps them: pass ``head_dim=None`` when changing ``dim``), ``kv_groups = n_heads // n_kv_heads``.
    Raises TypeError naming the field for a value of the wrong type (``tie_embeddings="false"``,
    a float ``dim``), ValueError for any inconsistent value or a size (all but
    ``max_position_embeddings``) above :data:`~attnkit.models.checkpoint.MAX_SIZE`.
    """

    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int = 128256
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    max_position_embeddings: int = 131072
    tie_embeddings: bool = False
    bos_token_id: Optional[int] = 128000
    eos_token_ids: tuple[int, ...] = (128001,)
    layer_patterns: Optional[tuple[Optional[Pattern], ...]] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Each number is stored as a plain Python value, so a config built from numpy or GGUF
        # numbers compares, prints and serialises like one built from literals.
        for name in ("dim", "n_layers", "n_heads", "ffn_dim", "vocab_size", "max_position_embeddings"):
            self._set(name, positive_int("LlamaConfig", name, getattr(self, name)))
        if self.n_kv_heads is None:
            self._set("n_kv_heads", self.n_heads)
        self._set("n_kv_heads", positive_int("LlamaConfig", "n_kv_heads", self.n_kv_heads))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            bounded_size("LlamaConfig", name, getattr(self, name))
        for name in ("norm_eps", "rope_theta"):
            self._set(name, finite_real("LlamaConfig", name, getattr(self, name)))
        self._set("tie_embeddings", boolean("LlamaConfig", "tie_embeddings", self.tie_embeddings))
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"LlamaConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                    "unless head_dim is given"
                )
            self._set("head_dim", self.dim // self.n_heads)
        self._set("head_dim", bounded_size("LlamaConfig", "head_dim", positive_int("LlamaConfig", "head_dim", self.head_dim)))
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig: norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise TypeError(
                f"LlamaConfig: rope_scaling must be Llama3RopeScaling or None, got {type(self.rope_scaling).__name__}"
            )
        if isinstance(self.eos_token_ids, (str, bytes)) or not hasattr(self.eos_token_ids, "__iter__"):
            raise TypeError(
                f"LlamaConfig: eos_token_ids must be a sequence of token ids, got "
                f"{type(self.eos_token_ids).__name__} {self.eos_token_ids!r}"
            )
        self._set("eos_token_ids", tuple(self._token_id("eos_token_ids", t) for t in self.eos_token_ids))
        if self.bos_token_id is not None:
            self._set("bos_token_id", self._token_id("bos_token_id", self.bos_token_id))
        if self.layer_patterns is not None:
            patterns = tuple(self.layer_patterns)
            if len(patterns) != self.n_layers:
                raise ValueError(
                    f"LlamaConfig: layer_patterns has {len(patterns)} entries for {self.n_layers} layers"
                )
            bad = [p for p in patterns if p is not None and not isinstance(p, Pattern)]
            if bad:
                raise TypeError(f"LlamaConfig: layer_patterns entries must be Patterns or None, got {bad[0]!r}")
            self._set("layer_patterns", patterns)

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _token_id(self, name: str, token: object) -> int:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < self.vocab_size:
            raise ValueError(f"LlamaConfig: {name} must be token ids below vocab_size, got {token!r}")
        return int(token)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        """A published configuration by name (see :data:`PRESETS`), optionally with fields replaced.

        ``head_dim`` is derived again when ``dim`` or ``n_heads`` is overridden without it.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown Llama preset {name!r}; known presets: {', '.join(PRESETS)}")
        if ("dim" in overrides or "n_heads" in overrides) and "head_dim" not in overrides:
            overrides["head_dim"] = None
        return replace(PRESETS[name], **overrides)


_LLAMA31_ROPE = Llama3RopeScaling(factor=8.0)
_LLAMA32_ROPE = Llama3RopeScaling(factor=32.0)

PRESETS: dict[str, LlamaConfig] = {
    "llama3.1-8b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                               rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": LlamaConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                                rope_scaling=_LLAMA31_ROPE),
    "llama3.1-405b": LlamaConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                                 rope_scaling=_LLAMA31_ROPE),
    "llama3.2-1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                               rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    "llama3.2-3b": LlamaConfig(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                               rope_scaling=_LLAMA32_ROPE, tie_embeddings=True),
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, vocab_size=256,
                        rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position_embeddings=64),
                        max_position_embeddings=512, bos_token_id=1, eos_token_ids=(2,)),
}
"""Published Llama 3.1 / 3.2 shapes (vocabulary 128256, eps 1e-5, theta 500000, rope factors
1 / 4 over 8192 original positions, 131072 max positions) and a ``tiny`` model for tests."""
