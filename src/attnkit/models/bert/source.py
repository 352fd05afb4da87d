"""Where a BERT encoder comes from: the loader and the layer and head counts that the model registry asks for."""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..checkpoint import CheckpointPath
from .hf_checkpoint import read_config
from .model import Bert


def load_bert(path: str | os.PathLike, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> Bert:
    """The :class:`Bert` of a Hugging Face directory (eval mode), moved to ``dtype`` and ``device`` when given."""
    return Bert.from_pretrained(path).to(device=device, dtype=dtype)


def _load_hf(source: CheckpointPath, dtype: Optional[torch.dtype], device: str | torch.device) -> Bert:
    return load_bert(source.path, dtype, device)


def layers_and_heads(source: CheckpointPath) -> tuple[int, int]:
    """``(layers, heads per layer)`` of a Hugging Face BERT directory, read from its ``config.json``."""
    config = read_config(source.path)
    return config.num_hidden_layers, config.num_attention_heads


LOADERS = {"hf": _load_hf}
"""Checkpoint format -> ``load(source, dtype, device)``: BERT is read from Hugging Face directories only."""
