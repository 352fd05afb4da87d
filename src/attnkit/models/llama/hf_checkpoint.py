"""Hugging Face checkpoint adapter for :class:`~attnkit.models.llama.Llama` (safetensors + ``config.json``).

A directory in the Hugging Face layout holds ``config.json`` (``LlamaForCausalLM``), the weights as
``model.safetensors`` or as shards listed by ``model.safetensors.index.json``, and optionally
``tokenizer.json``. This module converts configs and tensor names in both directions and reads and
writes the files; it never builds a model (``Llama.from_pretrained`` does, on the meta device,
assigning each tensor read here in place, so the weights exist once in memory).

Both config forms are read: the published one (``rope_theta`` + ``rope_scaling``) and the one
transformers 5 writes (``rope_parameters``). Saving writes the published form, which every
transformers version reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors.torch import save_file

from ...nn.rope import Llama3RopeScaling
from ..checkpoint import (CONFIG_FILE, HF_DECODER_LAYER_NAMES, INDEX_FILE, WEIGHTS_FILE, JsonFields, check_layer_count,
                          has_weights, hf_decoder_name, read_json, read_named_tensors, weight_files)
from .config import LlamaConfig

_LAYER_NAMES = {**HF_DECODER_LAYER_NAMES, "mlp_norm.weight": "post_attention_layernorm.weight"}


def hf_name(name: str) -> str:
    """The Hugging Face tensor name of an attnkit parameter name."""
    return hf_decoder_name(name, _LAYER_NAMES)


def _rope_scaling(rope: Optional[JsonFields], source: str) -> Optional[Llama3RopeScaling]:
    """The Llama 3.1 scaling of a ``rope_scaling`` / ``rope_parameters`` object (None: plain RoPE)."""
    if rope is None:
        return None
    rope_type = rope.string("rope_type", None) or rope.string("type", "default")
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default or llama3)")
    values = dict(
        factor=rope.real("factor"), low_freq_factor=rope.real("low_freq_factor"),
        high_freq_factor=rope.real("high_freq_factor"),
        original_max_position_embeddings=rope.integer("original_max_position_embeddings"),
    )
    try:
        return Llama3RopeScaling(**values)
    except ValueError as exc:
        raise ValueError(f"{source}: {rope.prefix.rstrip('.')}: {exc}") from None


def config_from_hf(hf: dict, source: str = CONFIG_FILE) -> LlamaConfig:
    """A :class:`LlamaConfig` from a parsed Hugging Face ``config.json`` (either rope form).

    Every field is type-checked as JSON (``"tie_word_embeddings": "false"`` is refused, not read
    as true). Raises ValueError naming ``source`` and the field for another architecture, biases, a
    non-SiLU activation, an unsupported rope type, a missing field or a value of the wrong type.
    """
    fields = JsonFields(hf, source)
    architectures = fields.strings("architectures", None) or ["LlamaForCausalLM"]
    if "model_type" not in fields:
        raise ValueError(f"{source} has no model_type field (a Llama's config.json says \"model_type\": \"llama\")")
    model_type = fields.string("model_type")
    if "LlamaForCausalLM" not in architectures or model_type != "llama":
        raise ValueError(
            f"{source}: unsupported architecture {architectures} / model_type {model_type!r}; "
            "attnkit loads LlamaForCausalLM"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if fields.boolean(flag, False):
            raise ValueError(f"{source}: {flag}=true is not supported by attnkit's Llama")
    hidden_act = fields.string("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"{source}: hidden_act {hidden_act!r} is not supported (Llama uses silu)")
    rope = fields.nested("rope_parameters") if "rope_parameters" in fields else fields.nested("rope_scaling")
    theta = fields.real("rope_theta", 10000.0)
    if rope is not None:
        theta = rope.real("rope_theta", theta)
    scaling = _rope_scaling(rope, source)
    bos = fields.integer("bos_token_id", None)
    eos = fields.integers("eos_token_id", [])
    config = dict(
        dim=fields.integer("hidden_size"), n_layers=fields.integer("num_hidden_layers"),
        n_heads=fields.integer("num_attention_heads"), n_kv_heads=fields.integer("num_key_value_heads", None),
        ffn_dim=fields.integer("intermediate_size"), vocab_size=fields.integer("vocab_size"),
        head_dim=fields.integer("head_dim", None), norm_eps=fields.real("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=fields.integer("max_position_embeddings", 2048),
        tie_embeddings=fields.boolean("tie_word_embeddings", False), bos_token_id=bos, eos_token_ids=tuple(eos),
    )
    try:
        return LlamaConfig(**config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None


def config_to_hf(config: LlamaConfig) -> dict:
    """The ``config.json`` dict transformers' ``LlamaForCausalLM`` reads for ``config``."""
    if config.layer_patterns and any(p is not None for p in config.layer_patterns):
        raise ValueError("save_pretrained: per-layer attention patterns have no Hugging Face config form")
    scaling = config.rope_scaling
    eos = list(config.eos_token_ids)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "intermediate_size": config.ffn_dim, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rope_scaling": None if scaling is None else {
            "rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        },
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": "float32",
    }


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` of a checkpoint directory (or of a ``config.json`` path).

    A directory's ``num_hidden_layers`` is checked against the layers its weights hold, when it
    holds weights, before anything is built from the config (ValueError naming the file)."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such config file")
    config = config_from_hf(read_json(file), str(file))
    if path.is_dir() and has_weights(path):
        check_layer_count(config.n_layers, weight_files(path), r"model\.layers\.(\d+)\.", file, "num_hidden_layers")
    return config


def read_weights(
    path: str | os.PathLike, config: LlamaConfig, shapes: Mapping[str, torch.Size], *,
    dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory under attnkit names, checked against ``shapes``
    (attnkit name -> shape, as ``parameter_shapes(config)`` gives them); they keep the file's dtype
    unless ``dtype`` is given. Raises FileNotFoundError for missing files and ValueError naming the
    file or tensor for missing, unexpected, mis-shaped or non-floating-point tensors, unreadable
    files, and index entries that are not file names inside ``path``.
    """
    # A tied checkpoint may still carry the head; it is the embedding, so it is skipped.
    tied_head = {"lm_head.weight"} if config.tie_embeddings else set()
    return read_named_tensors(Path(path), {name: hf_name(name) for name in shapes}, shapes, ignored=tied_head,
                              dtype=dtype, device=device)


def write_checkpoint(config: LlamaConfig, state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                     max_shard_bytes: Optional[int] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards of at most ``max_shard_bytes``
    each plus ``model.safetensors.index.json`` when the weights are larger) into ``path``, from a
    Llama ``state`` dict in attnkit names. Raises ValueError for a non-positive ``max_shard_bytes``
    or a config with per-layer patterns."""
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or max_shard_bytes <= 0):
        raise ValueError(f"save_pretrained: max_shard_bytes must be positive, got {max_shard_bytes!r}")
    hf = config_to_hf(config)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    hf["torch_dtype"] = str(state["embed_tokens.weight"].dtype).removeprefix("torch.")
    (directory / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    tensors = {hf_name(n): t.detach().contiguous().cpu() for n, t in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
