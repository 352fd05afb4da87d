"""The model families attnkit runs, and how a checkpoint is recognised as one of them.

A family is one :class:`Family` entry of :data:`FAMILIES`: its name, whether it is causal (it can
``generate`` and ``chat``; every family can be ``explain``-ed), the names its checkpoints carry
(``model_type`` in a Hugging Face ``config.json``, ``general.architecture`` in a GGUF file; a Meta
``params.json`` directory is a family's when it has a ``"meta"`` loader), one loader per checkpoint
format it reads, and how to read its layer and head counts without loading weights. Tokenizers
need no entry: :mod:`attnkit.models.tokenizer` reads every family's from the checkpoint itself.

Commands ask :func:`identify` what a path holds and call the family's loaders; none of them
names a model class. Adding a family is one folder under ``models/`` and one line here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from . import bert, llama
from .checkpoint import CONFIG_FILE, JsonFields, checkpoint_format, read_json
from .gguf_file import metadata, open_gguf

Loader = Callable[[Path, Optional[torch.dtype], "str | torch.device"], nn.Module]
"""``load(path, dtype, device) -> model`` in eval mode; ``dtype`` None keeps the stored dtype."""


@dataclass(frozen=True)
class Family:
    """One model family: what its checkpoints are called and how to load them.

    ``loaders`` maps each checkpoint format the family reads (``"hf"``, ``"gguf"``, ``"meta"``, as
    :func:`~attnkit.models.checkpoint.checkpoint_format` names them) to its :data:`Loader`;
    ``layers_and_heads(path, format) -> (layers, heads per layer)`` reads only the config.
    """

    name: str
    causal: bool
    loaders: Mapping[str, Loader]
    layers_and_heads: Callable[[Path, str], tuple[int, int]]
    model_types: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()

    def load(self, checkpoint: "Checkpoint", *, dtype: Optional[torch.dtype] = None,
             device: str | torch.device = "cpu") -> nn.Module:
        """The model of ``checkpoint`` (eval mode), in ``dtype`` when given."""
        return self.loaders[checkpoint.format](checkpoint.path, dtype, device)


FAMILIES: tuple[Family, ...] = (
    Family("bert", causal=False, loaders=bert.LOADERS, layers_and_heads=bert.layers_and_heads,
           model_types=("bert",)),
    Family("llama", causal=True, loaders=llama.LOADERS, layers_and_heads=llama.layers_and_heads,
           model_types=("llama",), gguf_architectures=("llama",)),
)


@dataclass(frozen=True)
class Checkpoint:
    """A recognised checkpoint: its ``path``, ``format`` (``"hf"``, ``"gguf"``, ``"meta"``) and ``family``."""

    path: Path
    format: str
    family: Family

    def layers_and_heads(self) -> tuple[int, int]:
        """``(layers, heads per layer)``, read without loading weights."""
        return self.family.layers_and_heads(self.path, self.format)

    def load(self, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> nn.Module:
        """The model (eval mode), in ``dtype`` when given (else as stored; GGUF: float32)."""
        return self.family.load(self, dtype=dtype, device=device)


def _names(attribute: str) -> str:
    names = sorted({name for f in FAMILIES for name in getattr(f, attribute)})
    return " or ".join(names)


def identify(path: str | os.PathLike) -> Checkpoint:
    """Which family and format the checkpoint at ``path`` holds.

    Raises FileNotFoundError saying what is missing (the file, the directory, its config) and
    ValueError naming the file and the value for a ``model_type`` or GGUF architecture that no
    family reads, or a format the family has no loader for.
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "gguf":
        architecture = metadata(open_gguf(path), path, "general.architecture", required=True)
        found = [f for f in FAMILIES if architecture in f.gguf_architectures]
        if not found:
            raise ValueError(f"{path}: unsupported architecture {architecture!r}; attnkit loads GGUF files of "
                             f"architecture {_names('gguf_architectures')}")
    elif fmt == "hf":
        file = path / CONFIG_FILE
        model_type = JsonFields(read_json(file), file).string("model_type", None)
        found = [f for f in FAMILIES if model_type in f.model_types]
        if not found:
            raise ValueError(f"model_type {model_type!r} in {file} is not supported; "
                             f"use a {_names('model_types')} checkpoint")
    else:
        found = [f for f in FAMILIES if fmt in f.loaders]
        if not found:
            raise ValueError(f"{path}: no model family reads {fmt} checkpoints")
    family = found[0]
    if fmt not in family.loaders:
        raise ValueError(f"{path}: attnkit reads no {fmt} checkpoint of a {family.name} model")
    return Checkpoint(path, fmt, family)


def identify_causal(path: str | os.PathLike) -> Checkpoint:
    """:func:`identify`, refusing an encoder: ValueError naming the family and the causal ones."""
    checkpoint = identify(path)
    if not checkpoint.family.causal:
        causal = " or ".join(f.name for f in FAMILIES if f.causal)
        raise ValueError(f"{checkpoint.path} holds a {checkpoint.family.name} encoder, which cannot generate "
                         f"text; give a {causal} checkpoint")
    return checkpoint
