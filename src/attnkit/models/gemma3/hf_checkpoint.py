"""Hugging Face checkpoint adapter for :class:`~attnkit.models.gemma3.Gemma3` (safetensors + ``config.json``).

A directory of transformers' ``Gemma3ForCausalLM`` (``model_type`` ``gemma3_text``, as the 270M
and 1B are published) holds ``config.json``, the weights as ``model.safetensors`` or shards, and
optionally ``tokenizer.json``. Hugging Face stores each RMSNorm weight as its offset from 1
(``w``, the model computes ``1 + w``), as attnkit does, so tensors only change names.

Both config forms are read: the one transformers 5 writes (``rope_parameters``, a RoPE block per
layer kind) and the published one (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling`` for
the global layers; ``sliding_window_pattern`` where ``layer_types`` is missing). Absent optional
fields take the defaults of transformers' ``Gemma3TextConfig``, so a directory reads as
transformers reads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from ...nn.rope import LinearRopeScaling
from ..checkpoint import CONFIG_FILE, HF_DECODER_LAYER_NAMES, JsonFields, hf_decoder_name, read_json, read_named_tensors
from .config import FULL, SLIDING, Gemma3Config

MODEL_TYPE = "gemma3_text"
"""``model_type`` of the ``config.json`` this adapter reads."""

_HIDDEN_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
_HF_DEFAULT_GLOBAL_THETA, _HF_DEFAULT_LOCAL_THETA = 1_000_000.0, 10_000.0

_LAYER_NAMES = {
    **HF_DECODER_LAYER_NAMES,
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.weight": "pre_feedforward_layernorm.weight",
    "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
}


def hf_name(name: str) -> str:
    """The Hugging Face tensor name of an attnkit parameter name."""
    return hf_decoder_name(name, _LAYER_NAMES)


def _rope(fields: JsonFields, source: str) -> tuple[float, float, Optional[LinearRopeScaling]]:
    """``(global theta, local theta, global scaling)`` from either config form."""
    if "rope_parameters" in fields:
        blocks = fields.nested("rope_parameters")
        full, sliding = blocks.nested(FULL), blocks.nested(SLIDING)
        global_theta = full.real("rope_theta", _HF_DEFAULT_GLOBAL_THETA) if full else _HF_DEFAULT_GLOBAL_THETA
        local_theta = sliding.real("rope_theta", _HF_DEFAULT_LOCAL_THETA) if sliding else _HF_DEFAULT_LOCAL_THETA
        if sliding is not None and _scaling(sliding, source) is not None:
            raise ValueError(f"{source}: RoPE scaling of the sliding-window layers is not supported")
        return global_theta, local_theta, _scaling(full, source)
    return (fields.real("rope_theta", _HF_DEFAULT_GLOBAL_THETA),
            fields.real("rope_local_base_freq", _HF_DEFAULT_LOCAL_THETA),
            _scaling(fields.nested("rope_scaling"), source))


def _scaling(rope: Optional[JsonFields], source: str) -> Optional[LinearRopeScaling]:
    if rope is None:
        return None
    rope_type = rope.string("rope_type", None) or rope.string("type", "default")
    if rope_type == "default":
        return None
    if rope_type != "linear":
        raise ValueError(f"{source}: {rope.prefix}rope_type {rope_type!r} is not supported (default or linear)")
    try:
        return LinearRopeScaling(rope.real("factor"))
    except ValueError as exc:
        raise ValueError(f"{source}: {rope.prefix.rstrip('.')}: {exc}") from None


def _layer_types(fields: JsonFields, n_layers: int, source: str) -> tuple[str, ...]:
    if "layer_types" in fields:
        kinds = fields.raw["layer_types"]
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise ValueError(f"{source}: layer_types must be a list of {SLIDING!r} / {FULL!r}")
        return tuple(kinds)
    every = fields.integer("sliding_window_pattern", 6)
    if every <= 0:
        raise ValueError(f"{source}: sliding_window_pattern must be positive, got {every}")
    return tuple(FULL if (i + 1) % every == 0 else SLIDING for i in range(n_layers))


def config_from_hf(hf: dict, source: str = CONFIG_FILE, generation: Optional[dict] = None) -> Gemma3Config:
    """A :class:`Gemma3Config` from a parsed ``config.json`` (either rope form) and, when given,
    ``generation_config.json`` (whose ``eos_token_id`` adds the end-of-turn token).

    Raises ValueError naming ``source`` and the field for another model type, biases, another
    activation, logit soft-capping, bidirectional attention, an unsupported rope type, a missing
    field or a value of the wrong type.
    """
    fields = JsonFields(hf, source)
    model_type = fields.string("model_type") if "model_type" in fields else None
    if model_type != MODEL_TYPE:
        raise ValueError(f"{source}: model_type {model_type!r} is not Gemma 3's text model ({MODEL_TYPE!r})")
    if fields.boolean("attention_bias", False):
        raise ValueError(f"{source}: attention_bias=true is not supported by attnkit's Gemma 3")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cap in fields:
            raise ValueError(f"{source}: {cap} is set; Gemma 3 has none and attnkit's Gemma 3 does not apply one")
    if fields.boolean("use_bidirectional_attention", False):
        raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (attnkit's Gemma 3 is causal)")
    activation = fields.string("hidden_activation", None) or fields.string("hidden_act", "gelu_pytorch_tanh")
    if activation not in _HIDDEN_ACTIVATIONS:
        raise ValueError(f"{source}: hidden_activation {activation!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
    n_layers = fields.integer("num_hidden_layers")
    global_theta, local_theta, scaling = _rope(fields, source)
    eos = fields.integers("eos_token_id", [1])
    if generation is not None:
        eos += JsonFields(generation, source.replace(CONFIG_FILE, "generation_config.json")).integers("eos_token_id", [])
    config = dict(
        dim=fields.integer("hidden_size"), n_layers=n_layers, n_heads=fields.integer("num_attention_heads"),
        n_kv_heads=fields.integer("num_key_value_heads"), head_dim=fields.integer("head_dim", 256),
        ffn_dim=fields.integer("intermediate_size"), vocab_size=fields.integer("vocab_size"),
        sliding_window=fields.integer("sliding_window", 4096), layer_types=_layer_types(fields, n_layers, source),
        rope_theta=global_theta, rope_local_theta=local_theta, rope_scaling=scaling,
        query_pre_attn_scalar=fields.real("query_pre_attn_scalar", 256.0), norm_eps=fields.real("rms_norm_eps", 1e-6),
        max_position_embeddings=fields.integer("max_position_embeddings", 131072),
        tie_embeddings=fields.boolean("tie_word_embeddings", True), bos_token_id=fields.integer("bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )
    try:
        return Gemma3Config(**config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def read_config(path: str | os.PathLike) -> Gemma3Config:
    """The :class:`Gemma3Config` of a checkpoint directory (with its ``generation_config.json``,
    when present), or of a ``config.json`` path."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    generation_file = file.parent / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else None
    return config_from_hf(read_json(file), str(file), generation)


def read_weights(path: str | os.PathLike, config: Gemma3Config, shapes: Mapping[str, torch.Size], *,
                 dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory under attnkit names, checked against ``shapes``
    (as :func:`~attnkit.models.gemma3.model.parameter_shapes` gives them); errors as
    :func:`~attnkit.models.checkpoint.read_named_tensors`."""
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()
    return read_named_tensors(Path(path), {name: hf_name(name) for name in shapes}, shapes, ignored=tied_head,
                              dtype=dtype, device=device)
