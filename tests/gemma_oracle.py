"""Tiny random Gemma 3 models for the Gemma tests: transformers' Gemma3ForCausalLM as the oracle.

Weights are O(1)-scale (matrix rows of unit norm, norm offsets around 0) and the configs are
chosen so a plausible bug moves the logits far beyond rounding: a window (5) much shorter than the
prompts, one global layer between window layers, local and global RoPE bases far apart, linear
RoPE scaling on the global layers, and a query scalar that is not ``head_dim``.

transformers computes its RMSNorm and its rotary angles in float32 even for a float64 model;
:func:`float64_oracle` makes those two float64 too (same formulas), so the float64 comparison
is exact to rounding instead of to float32.
"""

from __future__ import annotations

import contextlib

import torch

transformers = __import__("pytest").importorskip("transformers")

from transformers.models.gemma3 import modeling_gemma3  # noqa: E402

from attnkit.nn import KVCache, RollingKVCache  # noqa: E402

SHAPES = {
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2),
}
WINDOW = 5
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
VOCAB = 97


def hf_config(shape: str = "mqa", *, legacy: bool = False, window: int = WINDOW, layer_types=None,
              query_scalar: int = 24, **overrides):
    """A transformers Gemma3TextConfig; ``legacy`` writes the published keys (``rope_theta``,
    ``rope_local_base_freq``, ``rope_scaling``) instead of ``rope_parameters``."""
    kwargs = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4, head_dim=16,
                  sliding_window=window, layer_types=list(layer_types or LAYER_TYPES), max_position_embeddings=256,
                  query_pre_attn_scalar=query_scalar, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])
    kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    if legacy:
        kwargs.update(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    else:
        kwargs.update(rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
        })
    kwargs.update(overrides)
    return transformers.Gemma3TextConfig(**kwargs)


def hf_model(config, seed: int = 0):
    """``Gemma3ForCausalLM(config)`` in eval mode with O(1)-scale random weights."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn_like(param) / param.shape[-1] ** 0.5)
            else:
                param.copy_(0.2 * torch.randn_like(param))  # Gemma stores norm weights as offsets from 1
    return model


def _norm_forward(self, x):
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
    return (normed * (1.0 + self.weight.to(wide.dtype))).to(x.dtype)


def _rope_forward(self, x, position_ids, layer_type):
    inv_freq = getattr(self, f"{layer_type}_inv_freq")
    angles = position_ids[..., None].to(inv_freq.dtype) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


@contextlib.contextmanager
def float64_oracle(model):
    """``model`` (a float64 Gemma3ForCausalLM) with its RMSNorm and rotary angles computed in
    float64, as written in transformers (``x * rsqrt(mean(x^2) + eps) * (1 + w)``; ``theta ** (-2f / D)``,
    divided by the linear factor)."""
    config, rotary = model.config, model.model.rotary_emb
    saved = {kind: getattr(rotary, f"{kind}_inv_freq") for kind in rotary.layer_types}
    for kind in rotary.layer_types:
        rope = config.rope_parameters[kind]
        inv_freq = rope["rope_theta"] ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
        setattr(rotary, f"{kind}_inv_freq", inv_freq / rope.get("factor", 1.0))
    norm, rope_forward = modeling_gemma3.Gemma3RMSNorm.forward, modeling_gemma3.Gemma3RotaryEmbedding.forward
    modeling_gemma3.Gemma3RMSNorm.forward = _norm_forward
    modeling_gemma3.Gemma3RotaryEmbedding.forward = _rope_forward
    try:
        yield model
    finally:
        modeling_gemma3.Gemma3RMSNorm.forward, modeling_gemma3.Gemma3RotaryEmbedding.forward = norm, rope_forward
        for kind, inv_freq in saved.items():
            setattr(rotary, f"{kind}_inv_freq", inv_freq)


def our_cached_pairs(cache: KVCache | RollingKVCache) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Position -> (k, v) ``(B, Hkv, D)`` of every token an attnkit cache holds (a rolling cache
    keeps token ``t`` in slot ``t % window``)."""
    if isinstance(cache, RollingKVCache):
        first = cache.length - cache.stored
        return {t: (cache.keys[:, :, t % cache.window], cache.values[:, :, t % cache.window])
                for t in range(first, cache.length)}
    return {t: (cache.keys[:, :, t], cache.values[:, :, t]) for t in range(cache.length)}


def hf_cached_pairs(layer) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Position -> (k, v) of every token a transformers cache layer holds (a sliding layer keeps
    the last ``sliding_window - 1`` in order)."""
    total = layer.cumulative_length if getattr(layer, "is_sliding", False) else layer.keys.shape[2]
    first = total - layer.keys.shape[2]
    return {first + i: (layer.keys[:, :, i], layer.values[:, :, i]) for i in range(layer.keys.shape[2])}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())
