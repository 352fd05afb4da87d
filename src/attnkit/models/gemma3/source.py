"""Where a Gemma 3 comes from: the loaders the model registry calls for each checkpoint format
(the Gemma 3 270M file is found by name, ``gemma3-270m``, through :mod:`attnkit.models.catalog`).

Formats: ``"hf"`` (a Hugging Face ``gemma3_text`` directory, :mod:`.hf_checkpoint`) and ``"gguf"``
(a llama.cpp file of architecture ``gemma3``, :mod:`.gguf_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import CheckpointPath
from .gguf_checkpoint import config_from_gguf, load_gguf
from .hf_checkpoint import read_config, read_weights
from .model import Gemma3, parameter_shapes


def load_hf(path: str | Path, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> Gemma3:
    """The :class:`Gemma3` of a Hugging Face directory, weights in the file's dtype unless ``dtype``
    is given. Raises FileNotFoundError when ``path`` is not a directory, else as
    :func:`.hf_checkpoint.read_config` and :func:`.hf_checkpoint.read_weights`."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    config = read_config(path)
    state = read_weights(path, config, parameter_shapes(config), dtype=dtype, device=device)
    return Gemma3.from_state(config, state, device)


def _load_hf(source: CheckpointPath, dtype: Optional[torch.dtype], device: str | torch.device) -> Gemma3:
    return load_hf(source.path, dtype=dtype, device=device)


def _load_gguf(source: CheckpointPath, dtype: Optional[torch.dtype], device: str | torch.device) -> Gemma3:
    # Quantized GGUF types have no torch dtype of their own: they are dequantized to float32.
    return load_gguf(source.path, dtype=dtype or torch.float32, device=device, reader=source.gguf)


LOADERS: dict[str, Callable[[CheckpointPath, Optional[torch.dtype], str | torch.device], Gemma3]] = {
    "hf": _load_hf, "gguf": _load_gguf,
}
"""Checkpoint format -> ``load(source, dtype, device)``; a directory keeps its stored dtype unless
``dtype`` is given (GGUF: float32). A GGUF loader reuses ``source.gguf``, the file parsed once."""


def layers_and_heads(source: CheckpointPath) -> tuple[int, int]:
    """``(layers, query heads per layer)`` of a checkpoint, read without its weights."""
    config = config_from_gguf(source.gguf, source.path) if source.format == "gguf" else read_config(source.path)
    return config.n_layers, config.n_heads
