"""The native decoding step of a quantized Llama or Gemma 3 model: the whole decoder in one C call per token.

:func:`native_step` reads a model built from attnkit parts and its caches (already holding the
prompt, which the torch path prefilled) into a :class:`~attnkit.kernels.native_step.StepPlan`:
every layer's GGUF blocks (the fused q/k/v and gate/up weights of :mod:`.fuse` when present),
its norms' weights, its cache buffers, its rotary frequencies and its pattern's band. Each
:class:`NativeStep` call then computes, in ``csrc/decode_step.c``, what the torch step computes
for one new token (see that file for the operations), writing the token's keys and values into
the same cache buffers, and returns float32 logits. No torch operation runs per token.

It applies (:func:`native_step` returns a step; otherwise it raises :class:`NativeStepUnsupported`
saying why, and :class:`~attnkit.models.decode_step.DecodeStep` keeps the torch step) to:

- a :class:`~attnkit.models.llama.Llama` or :class:`~attnkit.models.gemma3.Gemma3` with GGUF
  quantized layers (:func:`~attnkit.models.quant.is_quantized`) on the CPU, float32 activations
  (its norms' weights), every other matrix a float32 ``nn.Linear`` without bias (not packed by
  ``pack_for_cpu``), no attention sinks, every layer's pattern one band (causal, sliding window);
- one row (batch 1) without a padding mask;
- caches :class:`~attnkit.nn.KVCache` / :class:`~attnkit.nn.RollingKVCache` of float32;
- both native libraries built (``decode_step`` and ``gguf_matmul``; ``ATTNKIT_NATIVE=0`` turns
  them, and so this step, off).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..kernels.native_step import LayerSpec, LinearSpec, StepPlan, native_step_available
from ..nn.kv_cache import KVCache
from ..nn.norm import RMSNorm, ZeroCenteredRMSNorm
from ..nn.rolling_cache import RollingKVCache
from ..patterns import shared_band
from .quant import QuantizedEmbedding, QuantizedLinear, is_quantized


_FAMILIES = {"attnkit.models.llama.model.Llama": "llama", "attnkit.models.gemma3.model.Gemma3": "gemma3"}
"""The model classes whose forward pass ``decode_step.c`` computes, by qualified name (named, not
imported: those modules import generation, which imports this one)."""


class NativeStepUnsupported(ValueError):
    """The native step does not apply to this model, these caches or this call (the message says why)."""


def _linear(where: str, module: Optional[nn.Module]) -> LinearSpec:
    if isinstance(module, QuantizedLinear):
        return LinearSpec(module.blocks.contiguous(), module.fmt, module.activations == "int8")
    if type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32:
        return LinearSpec(module.weight.detach().contiguous())
    raise NativeStepUnsupported(f"{where} is {type(module).__name__}, not a GGUF quantized or float32 "
                                "nn.Linear without bias")


def _group(where: str, fused, parts: Sequence[nn.Module]) -> list[LinearSpec]:
    """One spec for the fused weight of :mod:`.fuse` when there is one, else one per part."""
    if fused is not None:  # a _FusedCall: its weight, in the activations mode of its first member
        return [LinearSpec(fused.fused.blocks.contiguous(), fused.fused.fmt, fused.first.activations == "int8")]
    return [_linear(f"{where}.{i}", part) for i, part in enumerate(parts)]


def _norm(where: str, module: nn.Module, kind: type, eps: float) -> torch.Tensor:
    if type(module) is not kind or module.weight.dtype != torch.float32:
        raise NativeStepUnsupported(f"{where} is {type(module).__name__} of {module.weight.dtype}, not a float32 "
                                    f"{kind.__name__}")
    if module.eps != eps:
        raise NativeStepUnsupported(f"{where} has eps {module.eps}, the model's other norms {eps}")
    return module.weight.detach().contiguous()


def _cache_buffers(where: str, cache: object, pattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    if type(cache) not in (KVCache, RollingKVCache):
        raise NativeStepUnsupported(f"{where} is {type(cache).__name__}, not a KVCache or RollingKVCache")
    if cache.keys.dtype != torch.float32 or cache.keys.shape[0] != 1:
        raise NativeStepUnsupported(f"{where} holds {cache.keys.dtype} {tuple(cache.keys.shape)}; the native step "
                                    "takes float32 caches of one row")
    rolling = isinstance(cache, RollingKVCache)
    if rolling:
        try:
            cache.check_pattern(pattern)
        except ValueError as error:
            raise NativeStepUnsupported(f"{where}: {error}") from None
    return cache.keys, cache.values, cache.positions, rolling


def _layer(i: int, block: nn.Module, cache: object, norm_kind: type, eps: float, gemma: bool) -> LayerSpec:
    where = f"layers[{i}]"
    attn, mlp = block.attn, block.mlp
    if attn.sinks is not None:
        raise NativeStepUnsupported(f"{where}.attn has attention sinks")
    band = shared_band(attn.pattern)
    if band is None:
        raise NativeStepUnsupported(f"{where}.attn's pattern {attn.pattern!r} is not one band")
    if attn.rope is None or attn.rope.inv_freq.dtype != torch.float64:
        raise NativeStepUnsupported(f"{where}.attn has no rotary embedding with float64 frequencies")
    keys, values, positions, rolling = _cache_buffers(f"caches[{i}]", cache, attn.pattern)
    norms = {name: _norm(f"{where}.{name}", getattr(block, name), norm_kind, eps)
             for name in (("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm") if gemma
                          else ("attn_norm", "mlp_norm"))}
    if gemma:
        norms["q_norm"] = _norm(f"{where}.attn.q_norm", attn.q_norm, norm_kind, eps)
        norms["k_norm"] = _norm(f"{where}.attn.k_norm", attn.k_norm, norm_kind, eps)
    elif attn.q_norm is not None:
        raise NativeStepUnsupported(f"{where}.attn has q/k norms, which Llama's native step does not take")
    return LayerSpec(
        qkv=_group(f"{where}.attn.qkv", attn.fused_qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
        o=_linear(f"{where}.attn.o_proj", attn.o_proj),
        gate_up=_group(f"{where}.mlp.gate_up", mlp.fused_gate_up, (mlp.gate_proj, mlp.up_proj)),
        down=_linear(f"{where}.mlp.down_proj", mlp.down_proj),
        keys=keys, values=values, positions=positions, rolling=rolling, band=band,
        inv_freq=attn.rope.inv_freq.to(torch.float32).contiguous(),
        scale=attn.head_dim ** -0.5 if attn.scale is None else attn.scale, **norms,
    )


def _embedding(model: nn.Module) -> LinearSpec:
    embed = model.embed_tokens
    if isinstance(embed, QuantizedEmbedding):
        return LinearSpec(embed.blocks.contiguous(), embed.fmt)
    if type(embed) is nn.Embedding and embed.weight.dtype == torch.float32:
        return LinearSpec(embed.weight.detach().contiguous())
    raise NativeStepUnsupported(f"embed_tokens is {type(embed).__name__}, not a quantized or float32 embedding")


def native_step(model: nn.Module, caches: Sequence[object], key_mask: Optional[torch.Tensor]) -> "NativeStep":
    """The native step of ``model`` over ``caches`` (see the module docstring for when it applies).

    Raises:
        NativeStepUnsupported: naming what does not apply (the model family, a layer, a cache,
            the batch, the padding mask, the libraries).
    """
    family = _FAMILIES.get(f"{type(model).__module__}.{type(model).__qualname__}")
    if family is None:
        raise NativeStepUnsupported(f"the model is a {type(model).__name__}, not a Llama or Gemma3")
    if model.device.type != "cpu" or not is_quantized(model):
        raise NativeStepUnsupported("the model is not a GGUF quantized model on the CPU")
    if key_mask is not None:
        raise NativeStepUnsupported("rows are padded (a key mask); the native step takes one unpadded row")
    if len(caches) != len(model.layers):
        raise NativeStepUnsupported(f"{len(caches)} caches for {len(model.layers)} layers")
    if not native_step_available():
        raise NativeStepUnsupported("the native libraries are not built (attnkit info says why)")
    gemma = family == "gemma3"
    config, norm_kind = model.config, ZeroCenteredRMSNorm if gemma else RMSNorm
    eps = model.norm.eps
    head = model.lm_head if model.lm_head is not None else model.embed_tokens
    head_spec = _embedding(model) if head is model.embed_tokens else _linear("lm_head", head)
    layers = [_layer(i, block, cache, norm_kind, eps, gemma) for i, (block, cache) in enumerate(zip(model.layers, caches))]
    embed_scale = float(model.embed_scale()) if gemma else 1.0
    try:
        plan = StepPlan(family, dim=config.dim, n_heads=config.n_heads,
                        n_kv_heads=config.n_kv_heads, head_dim=config.head_dim, ffn_dim=config.ffn_dim, eps=eps,
                        embed_scale=embed_scale, embed=_embedding(model), head=head_spec,
                        final_norm=_norm("norm", model.norm, norm_kind, eps), layers=layers)
    except ValueError as error:  # a shape or layout the plan does not take
        raise NativeStepUnsupported(str(error)) from None
    return NativeStep(plan)


class NativeStep:
    """``step(tokens (1,), rope_positions, cache_position (1,)) -> logits (1, vocab)`` float32 by
    :meth:`StepPlan.step`, the call of :class:`~attnkit.models.decode_step.DecodeStep` (the rotary
    position equals the cache position: one unpadded row)."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.plan.step(int(tokens[0]), int(cache_position[0])).view(1, -1)


__all__ = ["NativeStep", "NativeStepUnsupported", "native_step"]
