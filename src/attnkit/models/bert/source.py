"""Where a BERT encoder comes from: the loader and the layer and head counts that the model registry asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .hf_checkpoint import read_config
from .model import Bert

def load_bert(path: Path, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> Bert:
    """The :class:`Bert` of a Hugging Face directory (eval mode), moved to ``dtype`` and ``device`` when given."""
    return Bert.from_pretrained(path).to(device=device, dtype=dtype)


def layers_and_heads(path: Path, fmt: str) -> tuple[int, int]:
    """``(layers, heads per layer)`` of a Hugging Face BERT directory, read from its ``config.json``."""
    config = read_config(path)
    return config.num_hidden_layers, config.num_attention_heads


LOADERS = {"hf": load_bert}
"""Checkpoint format -> ``load(path, dtype, device)``: BERT is read from Hugging Face directories only."""
