"""The model families attnkit runs, and how a checkpoint is recognised as one of them.

A family is one :class:`Family` entry of :data:`FAMILIES`: its name, whether it is causal (it can
``generate`` and ``chat``; every family can be ``explain``-ed), whether ``--int8`` and CPU weight
packing apply to it, the names its checkpoints carry (``model_type`` in a Hugging Face
``config.json``, ``general.architecture`` in a GGUF file), one loader per checkpoint format it
reads, and how to read its layer and head counts without loading weights. Tokenizers need no
entry: :mod:`attnkit.models.tokenizer` reads every family's from the checkpoint itself.

Commands ask :func:`identify` what a path holds and call the family's loaders; none of them
names a model class. A GGUF file is parsed once, by :func:`identify`, and that parse serves the
layer counts, the tokenizer and the loader (:class:`~attnkit.models.checkpoint.CheckpointPath`).
Adding a family is one folder under ``models/`` and one line here.

Meta's ``params.json`` directories are no format of the registry: ``params.json`` leaves out the
RoPE scaling factor, so they are loaded only from Python, by
:func:`~attnkit.models.llama.meta_checkpoint.load_meta_checkpoint` given ``rope_scaling``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from . import bert, gemma3, llama
from .checkpoint import CONFIG_FILE, CheckpointPath, JsonFields, checkpoint_format, read_json
from .gguf_file import metadata
from .gguf_tokenizer import ChatTemplate
from .gemma3.chat import CHAT_TEMPLATE as GEMMA3_CHAT_TEMPLATE
from .gemma3.gguf_checkpoint import ARCHITECTURE as GEMMA3_GGUF_ARCHITECTURE
from .gemma3.hf_checkpoint import MODEL_TYPE as GEMMA3_MODEL_TYPE
from .llama.gguf_checkpoint import ARCHITECTURE as LLAMA_GGUF_ARCHITECTURE
from .llama.meta_checkpoint import meta_refusal
from .tokenizer import TextTokenizer, load_text_tokenizer

FORMATS = ("hf", "gguf")
"""The checkpoint formats a family may have loaders for, as
:func:`~attnkit.models.checkpoint.checkpoint_format` names them."""

Loader = Callable[[CheckpointPath, Optional[torch.dtype], "str | torch.device"], nn.Module]
"""``load(source, dtype, device) -> model`` in eval mode; ``dtype`` None keeps the stored dtype.
A GGUF loader reads ``source.gguf`` (the file parsed once) rather than opening the file again."""


@dataclass(frozen=True)
class Family:
    """One model family: what its checkpoints are called and how to load them.

    ``loaders`` maps each checkpoint format the family reads (``"hf"``, ``"gguf"``) to its
    :data:`Loader`; ``layers_and_heads(source) -> (layers, heads per layer)`` reads only the
    config. ``quantizable``: ``generate --int8`` and the CPU weight packing of ``generate`` and
    ``chat`` apply to its models; they replace every bias-free ``nn.Linear`` and read the model's
    ``embed_tokens`` (an ``nn.Embedding``) and ``lm_head`` (an ``nn.Linear``, None when tied to
    the embedding), so only a family whose models have those may say True. ``chat_template``: the
    family's own chat format, for its checkpoints that carry none (Gemma 3's GGUF files).

    Raises ValueError when the entry contradicts itself: a loader for an unknown format, or
    checkpoint names (``model_types``, ``gguf_architectures``) of a format it has no loader for.
    """

    name: str
    causal: bool
    loaders: Mapping[str, Loader]
    layers_and_heads: Callable[[CheckpointPath], tuple[int, int]]
    model_types: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    quantizable: bool = field(default=False, kw_only=True)
    chat_template: Optional[ChatTemplate] = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loaders) - set(FORMATS))
        if unknown:
            raise ValueError(f"Family {self.name!r}: loaders for unknown formats {unknown}; formats are {FORMATS}")
        for names, fmt in ((self.model_types, "hf"), (self.gguf_architectures, "gguf")):
            if names and fmt not in self.loaders:
                raise ValueError(f"Family {self.name!r}: it names {fmt} checkpoints {names} but has no {fmt!r} loader")

    def load(self, source: CheckpointPath, *, dtype: Optional[torch.dtype] = None,
             device: str | torch.device = "cpu") -> nn.Module:
        """The model of ``source`` (eval mode), in ``dtype`` when given."""
        return self.loaders[source.format](source, dtype, device)


FAMILIES: tuple[Family, ...] = (
    Family("bert", causal=False, loaders=bert.LOADERS, layers_and_heads=bert.layers_and_heads,
           model_types=("bert",)),
    Family("llama", causal=True, loaders=llama.LOADERS, layers_and_heads=llama.layers_and_heads,
           model_types=("llama",), gguf_architectures=(LLAMA_GGUF_ARCHITECTURE,), quantizable=True),
    Family("gemma3", causal=True, loaders=gemma3.LOADERS, layers_and_heads=gemma3.layers_and_heads,
           model_types=(GEMMA3_MODEL_TYPE,), gguf_architectures=(GEMMA3_GGUF_ARCHITECTURE,), quantizable=True,
           chat_template=GEMMA3_CHAT_TEMPLATE),
)


@dataclass(frozen=True)
class Checkpoint:
    """A recognised checkpoint: its ``source`` (path, format and, for a GGUF file, the one parse
    that everything read from it shares: give ``source`` to the tokenizer too) and its ``family``."""

    source: CheckpointPath
    family: Family

    @property
    def path(self) -> Path:
        """Where the checkpoint lies: a directory or a ``.gguf`` file."""
        return self.source.path

    @property
    def format(self) -> str:
        """``"hf"`` or ``"gguf"``."""
        return self.source.format

    def layers_and_heads(self) -> tuple[int, int]:
        """``(layers, heads per layer)``, read without loading weights."""
        return self.family.layers_and_heads(self.source)

    def load(self, *, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> nn.Module:
        """The model (eval mode), in ``dtype`` when given (else as stored; GGUF: float32)."""
        return self.family.load(self.source, dtype=dtype, device=device)

    def text_tokenizer(self) -> TextTokenizer:
        """The checkpoint's tokenizer and chat template (the family's own template when the
        checkpoint carries none); errors as :func:`~attnkit.models.tokenizer.load_text_tokenizer`."""
        tokenizer = load_text_tokenizer(self.source)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = self.family.chat_template
        return tokenizer


def _names(attribute: str) -> str:
    names = sorted({name for f in FAMILIES for name in getattr(f, attribute)})
    return " or ".join(names)


def _one(found: list[Family], what: str) -> Family:
    if len(found) > 1:
        raise ValueError(f"model registry: families {' and '.join(f.name for f in found)} all claim {what}; "
                         "each checkpoint name must belong to one family")
    return found[0]


def identify(path: str | os.PathLike) -> Checkpoint:
    """Which family and format the checkpoint at ``path`` holds.

    Raises FileNotFoundError saying what is missing (the file, the directory, its config) and
    ValueError naming the file for a ``config.json`` without ``model_type``, a ``model_type`` or
    GGUF architecture that no family reads, a Meta ``params.json`` directory (saying how to load
    one), or a name that two families claim.
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    if fmt == "gguf":
        source = CheckpointPath(path, fmt)
        architecture = metadata(source.gguf, path, "general.architecture", required=True)
        found = [f for f in FAMILIES if architecture in f.gguf_architectures]
        if not found:
            raise ValueError(f"{path}: unsupported architecture {architecture!r}; attnkit loads GGUF files of "
                             f"architecture {_names('gguf_architectures')}")
        return Checkpoint(source, _one(found, f"GGUF architecture {architecture!r}"))
    if fmt != "hf":
        raise meta_refusal(path)
    file = path / CONFIG_FILE
    fields = JsonFields(read_json(file), file)
    if "model_type" not in fields:
        raise ValueError(f"{file} has no model_type field, so attnkit cannot tell which model it holds; "
                         f"attnkit reads model_type {_names('model_types')}")
    model_type = fields.string("model_type")
    found = [f for f in FAMILIES if model_type in f.model_types]
    if not found:
        raise ValueError(f"model_type {model_type!r} in {file} is not supported; "
                         f"use a {_names('model_types')} checkpoint")
    return Checkpoint(CheckpointPath(path, fmt), _one(found, f"model_type {model_type!r}"))


def identify_causal(path: str | os.PathLike) -> Checkpoint:
    """:func:`identify`, refusing an encoder: ValueError naming the family and the causal ones."""
    checkpoint = identify(path)
    if not checkpoint.family.causal:
        causal = " or ".join(f.name for f in FAMILIES if f.causal)
        raise ValueError(f"{checkpoint.path} holds a {checkpoint.family.name} encoder, which cannot generate "
                         f"text; give a {causal} checkpoint")
    return checkpoint
