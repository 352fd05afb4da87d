"""The Llama 3.1 / 3.2 decoder built from attnkit parts.

Block ``i``: ``h = x + attn(attn_norm(x))``, ``out = h + mlp(mlp_norm(h))`` where ``attn`` is
:class:`attnkit.nn.MultiHeadAttention` (GQA, RoPE hook, causal or the layer's own pattern) and
``mlp`` is :class:`attnkit.nn.mlp.SwiGLU`; then a final RMSNorm and the vocabulary head (the
embedding matrix itself when ``tie_embeddings``). Build it under ``meta_device()`` (:mod:`..checkpoint`) to
allocate nothing (for counting, or before loading a checkpoint in place).

Checkpoint formats are adapters beside this module, not branches inside it: each turns its file
into a :class:`LlamaConfig` and a state dict in attnkit's names, and :meth:`Llama.from_state`
builds the model. :mod:`.hf_checkpoint` (which the model's ``from_pretrained`` /
``save_pretrained`` use) imports only the config; :mod:`.gguf_checkpoint` and
:mod:`.meta_checkpoint` import this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from ...checks import check_token_ids
from ...nn.attention import MultiHeadAttention
from ...nn.kv_cache import KVCache
from ...nn.mlp import SwiGLU
from ...nn.norm import RMSNorm
from ...nn.rope import RotaryEmbedding
from ...patterns import Causal
from ..cpu_pack import is_packed
from ..quant import is_quantized
from ..checkpoint import meta_device
from ..generate import generate as generate_tokens
from . import hf_checkpoint
from .config import LlamaConfig


class LlamaBlock(nn.Module):
    """One pre-norm decoder block; ``x (B, N, C) -> (B, N, C)``."""

    def __init__(self, config: LlamaConfig, rope: RotaryEmbedding, pattern) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = MultiHeadAttention(
            config.dim, config.n_heads, config.n_kv_heads, head_dim=config.head_dim,
            pattern=pattern or Causal(), rope=rope,
        )
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.ffn_dim)

    def forward(self, x, *, positions=None, cache=None, key_mask=None, cache_positions=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions=positions, cache=cache, key_mask=key_mask,
                          cache_positions=cache_positions)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Llama 3 decoder-only language model.

    Modules: ``embed_tokens (vocab, C)``, ``layers[i]`` (``attn_norm``, ``attn.{q,k,v,o}_proj``,
    ``mlp_norm``, ``mlp.{gate,up,down}_proj``), ``norm``, ``lm_head`` (None when tied, until
    :func:`~attnkit.models.cpu_pack.pack_for_cpu` gives it a packed copy of the embedding).
    The rotary tables are float32 whatever the weights' dtype.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"Llama: config must be a LlamaConfig, got {type(config).__name__}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        # One rotary module shared by every layer; kept out of the state dict (no persistent buffers).
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        patterns = config.layer_patterns or (None,) * config.n_layers
        self.layers = nn.ModuleList(LlamaBlock(config, self.rope, p) for p in patterns)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        """``(vocab, C)``: the output projection (the embedding matrix when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def device(self) -> torch.device:
        """Where the weights (and so the inputs and caches) live."""
        return self.norm.weight.device

    def make_caches(self, batch: int, max_len: int, *, dtype=None, device=None) -> list[KVCache]:
        """One static :class:`KVCache` ``(batch, Hkv, max_len, D)`` per layer, by default in the
        dtype of the activations (the norms' weights: float32 for quantized GGUF weights) and on
        the model's device."""
        weight = self.norm.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        c = self.config
        return [KVCache(batch, c.n_kv_heads, max_len, c.head_dim, dtype=dtype, device=device) for _ in self.layers]

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        caches: Optional[Sequence[KVCache]] = None,
        key_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
        cache_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits ``(B, N, vocab)`` (``(B, 1, vocab)`` with ``last_only``) of integer ``tokens (B, N)``.

        ``caches`` (from :meth:`make_caches`) receive the new keys/values at ``cache_positions``
        ``(N,)`` and supply the earlier ones; ``positions`` ``(N,)`` or ``(B, N)`` are the rotary
        positions; with caches both default to the next N after the newest cached position
        (``cache_positions`` default to ``positions`` when those are one row). ``key_mask``
        marks real tokens (see ``MultiHeadAttention.forward``).

        This is where token ids enter a model directly, so they are checked here: the range check
        reads ``tokens.min()`` and ``tokens.max()`` back (two reductions and a host sync per call,
        a few microseconds on a CPU). :func:`~attnkit.models.generate.generate` checks the prompt
        where it takes it and calls :meth:`forward_unchecked`, which checks nothing, for each step.
        Raises ValueError for a non-integer or non-2-D ``tokens``, ids outside the vocabulary,
        or a ``caches`` list whose length is not ``n_layers``.
        """
        check_token_ids("Llama", tokens, self.config.vocab_size)
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"Llama: caches has {len(caches)} entries for {len(self.layers)} layers")
        if caches is not None and positions is None and cache_positions is None:
            start = caches[0].length  # read once here, not by every layer
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        return self.forward_unchecked(tokens, positions=positions, caches=caches, key_mask=key_mask, last_only=last_only,
                           cache_positions=cache_positions)

    def forward_unchecked(
        self,
        tokens: torch.Tensor,
        *,
        positions: Optional[torch.Tensor] = None,
        caches: Optional[Sequence[KVCache]] = None,
        key_mask: Optional[torch.Tensor] = None,
        last_only: bool = False,
        cache_positions: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """:meth:`forward` without its checks: the caller vouches for ``tokens`` and ``caches``,
        and passes the positions when it passes caches. Reads nothing back to the host, so a
        decoding step built on it compiles into one graph (see :mod:`attnkit.models.decode_step`)."""
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions=positions, cache=None if caches is None else caches[i], key_mask=key_mask,
                      cache_positions=cache_positions)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        # lm_head is None for a tied model, unless pack_for_cpu gave it a packed copy.
        return self.lm_head(x) if self.lm_head is not None else nn.functional.linear(x, self.embed_tokens.weight)

    generate = generate_tokens
    """``model.generate(tokens, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, seed=None,
    stop_tokens=None, on_token=None)``: :func:`attnkit.models.generate.generate` on this model."""

    @classmethod
    def from_state(cls, config: LlamaConfig, state: Mapping[str, torch.Tensor],
                   device: str | torch.device = "cpu") -> "Llama":
        """A model (eval mode) that takes ``state``'s tensors as its own, without copying them.

        Every checkpoint adapter ends here once it has turned its file's tensors into attnkit
        names and shapes (see :func:`parameter_shapes`). Raises RuntimeError from
        ``load_state_dict`` for missing or unexpected names.
        """
        with meta_device():
            model = cls(config)
        model.load_state_dict(dict(state), assign=True, strict=True)
        model.rope.reset_frequencies(device)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
                        device: str | torch.device = "cpu") -> "Llama":
        """Load a Hugging Face layout directory (``config.json`` + safetensors); weights keep the
        file's dtype unless ``dtype`` is given. Raises FileNotFoundError when ``path`` is not a
        directory, else as :func:`.hf_checkpoint.read_config` and :func:`.hf_checkpoint.read_weights`."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: not a directory")
        config = hf_checkpoint.read_config(path)
        state = hf_checkpoint.read_weights(path, config, parameter_shapes(config), dtype=dtype, device=device)
        return cls.from_state(config, state, device)

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: Optional[int] = None) -> None:
        """Write ``config.json`` and safetensors that transformers' ``LlamaForCausalLM`` loads;
        see :func:`.hf_checkpoint.write_checkpoint`. Raises ValueError for a model packed by
        :func:`~attnkit.models.cpu_pack.pack_for_cpu` (its weights are no longer plain tensors)."""
        if is_packed(self):
            raise ValueError("save_pretrained: the model is packed for CPU inference (pack_for_cpu); save it before packing")
        if is_quantized(self):
            raise ValueError("save_pretrained: the model keeps GGUF quantized weights; load it with a dtype "
                             "(dequantized) to save it")
        hf_checkpoint.write_checkpoint(self.config, self.state_dict(), path, max_shard_bytes=max_shard_bytes)


def parameter_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """attnkit parameter name -> shape of ``Llama(config)``, found on the meta device (nothing is allocated)."""
    with meta_device():
        model = Llama(config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def count_parameters(config: LlamaConfig) -> int:
    """Parameters of ``Llama(config)``, counted on the meta device (nothing is allocated)."""
    with meta_device():
        model = Llama(config)
    return sum(p.numel() for p in model.parameters())
