"""The Gemma 3 text decoder built from attnkit parts.

Block ``i``: ``h = x + post_attn_norm(attn(attn_norm(x)))``, ``out = h + post_mlp_norm(mlp(mlp_norm(h)))``
where every norm is a :class:`~attnkit.nn.ZeroCenteredRMSNorm` (weight stored as its offset from
1), ``attn`` is :class:`attnkit.nn.MultiHeadAttention` with QK-norm, RoPE and the layer's own
pattern from the config (``SlidingWindow(sliding_window)`` with the local RoPE base, or
``Causal()`` with the global one), and ``mlp`` is :class:`attnkit.nn.GeGLU`. The token embedding
is multiplied by ``sqrt(dim)`` (rounded to float32 first, as Gemma's reference and transformers
do) and is also the vocabulary head.

Caches follow the layer pattern: a window layer keeps a :class:`~attnkit.nn.RollingKVCache` of
``sliding_window`` positions, a global layer a static :class:`~attnkit.nn.KVCache` of the whole
context (see :meth:`Gemma3.make_caches`).

Checkpoint formats are adapters beside this module (:mod:`.hf_checkpoint`, :mod:`.gguf_checkpoint`):
each turns its file into a :class:`Gemma3Config` and a state dict in attnkit's names, and
:meth:`Gemma3.from_state` builds the model.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ...checks import check_token_ids
from ...nn.attention import MultiHeadAttention
from ...nn.kv_cache import KVCache
from ...nn.mlp import GeGLU
from ...nn.norm import ZeroCenteredRMSNorm
from ...nn.rolling_cache import RollingKVCache
from ...nn.rope import RotaryEmbedding
from ..checkpoint import meta_device
from ..generate import generate as generate_tokens
from .config import Gemma3Config


class Gemma3Block(nn.Module):
    """One decoder block with norms before and after attention and MLP; ``x (B, N, C) -> (B, N, C)``."""

    def __init__(self, config: Gemma3Config, pattern, rope: RotaryEmbedding) -> None:
        super().__init__()
        norm = partial(ZeroCenteredRMSNorm, eps=config.norm_eps)
        self.attn_norm = norm(config.dim)
        self.attn = MultiHeadAttention(
            config.dim, config.n_heads, config.n_kv_heads, head_dim=config.head_dim, pattern=pattern, rope=rope,
            scale=config.scale, qk_norm=norm,
        )
        self.post_attn_norm = norm(config.dim)
        self.mlp_norm = norm(config.dim)
        self.mlp = GeGLU(config.dim, config.ffn_dim)
        self.post_mlp_norm = norm(config.dim)

    def forward(self, x, *, positions=None, cache=None, key_mask=None, cache_positions=None) -> torch.Tensor:
        attended = self.attn(self.attn_norm(x), positions=positions, cache=cache, key_mask=key_mask,
                             cache_positions=cache_positions)
        x = x + self.post_attn_norm(attended)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x)))


class Gemma3(nn.Module):
    """Gemma 3 decoder-only language model (text).

    Modules: ``embed_tokens (vocab, C)``, ``layers[i]`` (``attn_norm``, ``attn.{q,k,v,o}_proj``,
    ``attn.{q,k}_norm``, ``post_attn_norm``, ``mlp_norm``, ``mlp.{gate,up,down}_proj``,
    ``post_mlp_norm``), ``norm``, ``lm_head`` (None when tied, until ``pack_for_cpu`` or ``quantize_int8``
    gives it a copy of the embedding). Layer ``i``'s pattern is
    ``config.layer_patterns[i]`` (also ``layers[i].attn.pattern``). The rotary tables are
    float32 (float64 for a float64 model) whatever the weights' dtype.
    """

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        if not isinstance(config, Gemma3Config):
            raise TypeError(f"Gemma3: config must be a Gemma3Config, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        # Two rotary modules, each shared by the layers of its kind; no persistent buffers.
        self.local_rope = RotaryEmbedding(config.head_dim, config.rope_local_theta)
        self.global_rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(
            Gemma3Block(config, pattern, self.global_rope if window is None else self.local_rope)
            for pattern, window in zip(config.layer_patterns, config.layer_windows)
        )
        self.norm = ZeroCenteredRMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    def embed_scale(self) -> torch.Tensor:
        """The embedding's multiplier ``sqrt(dim)``, a float32 scalar tensor: rounded to float32
        first (then to the activations' dtype by the caller), as Gemma's reference implementation."""
        return torch.tensor(math.sqrt(self.config.dim), dtype=torch.float32)

    @property
    def head_weight(self) -> torch.Tensor:
        """``(vocab, C)``: the output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        """Where the weights (and so the inputs and caches) live."""
        return self.norm.weight.device

    def make_caches(self, batch: int, max_len: int, *, dtype=None, device=None) -> list[KVCache | RollingKVCache]:
        """One cache per layer for ``max_len`` positions of ``batch`` rows, by default in the
        activations' dtype (the norms' weights: float32 for quantized GGUF weights) and on the
        model's device: a window layer keeps a :class:`RollingKVCache` of
        ``sliding_window`` positions (a :class:`KVCache` of ``max_len`` when that is no more), a
        global layer a :class:`KVCache` of ``max_len``. Each is ``(batch, Hkv, positions, D)``."""
        weight = self.norm.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        c = self.config
        caches = []
        for window in c.layer_windows:
            if window is not None and window < max_len:
                caches.append(RollingKVCache(batch, c.n_kv_heads, window, c.head_dim, dtype=dtype, device=device))
            else:
                caches.append(KVCache(batch, c.n_kv_heads, max_len, c.head_dim, dtype=dtype, device=device))
        return caches

    def hidden_states(
        self,
        tokens: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        caches: Optional[Sequence[KVCache | RollingKVCache]] = None,
        key_mask: Optional[torch.Tensor] = None,
        cache_positions: Optional[torch.Tensor] = None,
        checked: bool = True,
    ) -> torch.Tensor:
        """The final normalised hidden states ``(B, N, C)`` of integer ``tokens (B, N)``, the input
        of the vocabulary head; arguments and errors as :meth:`forward` (``checked=False``: none)."""
        if checked:
            check_token_ids("Gemma3", tokens, self.config.vocab_size)
            if caches is not None and len(caches) != len(self.layers):
                raise ValueError(f"Gemma3: caches has {len(caches)} entries for {len(self.layers)} layers")
        x = self.embed_tokens(tokens)
        x = x * self.embed_scale().to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions=positions, cache=None if caches is None else caches[i], key_mask=key_mask,
                      cache_positions=cache_positions)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., vocab)`` logits of final hidden states ``(..., C)``."""
        # lm_head is None for a tied model, unless pack_for_cpu or quantize_int8 gave it its own copy.
        if self.lm_head is not None:
            return self.lm_head(hidden)
        return nn.functional.linear(hidden, self.embed_tokens.weight)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        caches: Optional[Sequence[KVCache | RollingKVCache]] = None,
        key_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
        cache_positions: Optional[torch.Tensor] = None,
        checked: bool = True,
    ) -> torch.Tensor:
        """Logits ``(B, N, vocab)`` (``(B, 1, vocab)`` with ``last_only``) of integer ``tokens (B, N)``.

        ``caches`` (from :meth:`make_caches`) receive the new keys/values at ``cache_positions``
        ``(N,)`` and supply the earlier ones; ``positions`` ``(N,)`` or ``(B, N)`` are the rotary
        positions (both default to the next N after the cache); ``key_mask`` marks real tokens
        (see ``MultiHeadAttention.forward``).
        Raises ValueError for a non-integer or non-2-D ``tokens``, ids outside the vocabulary,
        or a ``caches`` list whose length is not ``n_layers`` (unless ``checked=False``: see
        :meth:`forward_unchecked`).
        """
        hidden = self.hidden_states(tokens, positions=positions, caches=caches, key_mask=key_mask,
                                    cache_positions=cache_positions, checked=checked)
        return self.logits(hidden[:, -1:] if last_only else hidden)

    def forward_unchecked(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """:meth:`forward` without its input checks (which read the token ids back to the host):
        what each decoding step of :func:`~attnkit.models.generate.generate` calls."""
        return self.forward(tokens, checked=False, **kwargs)

    generate = generate_tokens
    """``model.generate(tokens, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, seed=None,
    stop_tokens=None, on_token=None)``: :func:`attnkit.models.generate.generate` on this model."""

    @classmethod
    def from_state(cls, config: Gemma3Config, state: Mapping[str, torch.Tensor],
                   device: str | torch.device = "cpu", *, model: Optional["Gemma3"] = None) -> "Gemma3":
        """A model (eval mode) that takes ``state``'s tensors (attnkit names, norm weights as offsets
        from 1) as its own, without copying them; ``model``, when given, is a meta-device model
        whose quantized layers already hold their blocks (``state`` then has the other tensors).
        Raises RuntimeError from ``load_state_dict`` for missing or unexpected names."""
        if model is None:
            with meta_device():
                model = cls(config)
        blocks = {name: tensor for name, tensor in model.state_dict().items() if name not in state}
        model.load_state_dict({**state, **blocks}, assign=True, strict=True)
        model.local_rope.reset_frequencies(device)
        model.global_rope.reset_frequencies(device)
        return model.eval()


def parameter_shapes(config: Gemma3Config) -> dict[str, torch.Size]:
    """attnkit parameter name -> shape of ``Gemma3(config)``, found on the meta device (nothing is allocated)."""
    with meta_device():
        model = Gemma3(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}
