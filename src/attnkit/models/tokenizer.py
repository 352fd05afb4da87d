"""A checkpoint's tokenizer (``tokenizer.json`` or a GGUF file's vocabulary) through the ``tokenizers``
library, for every model family: :class:`Tokenizer` gives readable token labels (for ``explain``),
:class:`TextTokenizer` encodes, decodes and formats chats (for ``generate`` and ``chat``).

Works for WordPiece (BERT) and byte-level BPE (Llama) files alike. :class:`Tokenizer` switches off
padding and truncation settings stored in the file: a sentence becomes exactly its tokens,
specials included.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointPath, checkpoint_format, describe, read_json
from .gguf_file import is_gguf, open_gguf
from .gguf_tokenizer import ChatTemplate, chat_template_from_gguf, tokenizer_from_gguf

TOKENIZERS_HINT = 'pip install -e ".[llama]"  (the tokenizers package)'


@dataclass(frozen=True)
class Tokens:
    """One tokenised text: ``ids``, display ``labels``, which positions are ``special``, and the
    ``offsets`` ``(start, end)`` of each token in the text (``(0, 0)`` for added special tokens).

    A label is the piece of the original text the token covers (original case kept), prefixed
    with ``##`` when the token continues a word; special tokens show their own name (``[CLS]``).
    """

    ids: list[int]
    labels: list[str]
    special: list[bool]
    offsets: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.ids)


class Tokenizer:
    """``Tokenizer(path)(text) -> Tokens``; ``path`` is a ``tokenizer.json`` file, its directory,
    or a ``.gguf`` file (see :mod:`attnkit.models.gguf_tokenizer`), or a
    :class:`~attnkit.models.checkpoint.CheckpointPath`, whose GGUF file is then not parsed again.

    Raises FileNotFoundError when the file is missing and ImportError (with the install command)
    when the ``tokenizers`` package is not installed.
    """

    def __init__(self, path: str | os.PathLike | CheckpointPath) -> None:
        if isinstance(path, CheckpointPath) and path.format == "gguf":
            self._tok = tokenizer_from_gguf(path.gguf, path.path)
            return
        path = Path(path.path if isinstance(path, CheckpointPath) else path)
        if is_gguf(path):
            self._tok = tokenizer_from_gguf(open_gguf(path), path)
            return
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {file.parent}")
        try:  # optional package (the demo and llama extras), imported only when a file is read
            import tokenizers  # noqa: F401
        except ImportError:
            raise ImportError('reading tokenizer.json needs tokenizers: pip install -e ".[demo]"') from None
        self._tok = read_tokenizer_json(file)
        self._tok.no_padding()
        self._tok.no_truncation()

    def __call__(self, text: str) -> Tokens:
        enc = self._tok.encode(text)
        labels = []
        for token, (start, end), special in zip(enc.tokens, enc.offsets, enc.special_tokens_mask):
            if special or start == end:
                labels.append(token)
            else:
                piece = text[start:end].strip() or token
                labels.append(("##" + piece) if token.startswith("##") else piece)
        return Tokens(list(enc.ids), labels, [bool(s) for s in enc.special_tokens_mask], list(enc.offsets))

    def append(self, tokens: Tokens, ids: list[int]) -> Tokens:
        """``tokens`` followed by ``ids`` that are not in the text (generated ones): each labelled
        by decoding it alone (its token name when that is blank, ``<id N>`` for an id the
        tokenizer lacks: a model's vocabulary may be larger), offsets ``(0, 0)``."""
        special = {i for i, added in self._tok.get_added_tokens_decoder().items() if added.special}
        labels = [self._tok.decode([i], skip_special_tokens=False).strip() or self._tok.id_to_token(i) or f"<id {i}>"
                  for i in ids]
        return Tokens(tokens.ids + list(ids), tokens.labels + labels,
                      tokens.special + [i in special for i in ids], tokens.offsets + [(0, 0)] * len(ids))


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


def load_text_tokenizer(path: str | os.PathLike | CheckpointPath) -> TextTokenizer:
    """The tokenizer and chat template of a Hugging Face directory (``tokenizer.json``,
    ``tokenizer_config.json``) or of a ``.gguf`` file; given a
    :class:`~attnkit.models.checkpoint.CheckpointPath`, its parsed GGUF file is reused. Raises
    FileNotFoundError for a missing checkpoint or tokenizer, ImportError naming the extra without
    the ``tokenizers`` package."""
    if importlib.util.find_spec("tokenizers") is None:
        raise ImportError(f"reading a tokenizer needs the tokenizers package: {TOKENIZERS_HINT}")
    source = path if isinstance(path, CheckpointPath) else CheckpointPath(Path(path), checkpoint_format(path))
    path = source.path
    if source.format == "gguf":
        reader = source.gguf
        return TextTokenizer(tokenizer_from_gguf(reader, path), chat_template_from_gguf(reader, path))
    file = path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"model directory {path} has no tokenizer.json, which generate needs to read the prompt")
    return TextTokenizer(read_tokenizer_json(file), _chat_template(path))


def read_tokenizer_json(file: Path):
    """A ``tokenizers.Tokenizer`` from ``file``; ValueError naming the file when it is damaged
    (``tokenizers`` raises a bare ``Exception`` that does not name it)."""
    from tokenizers import Tokenizer as HFTokenizer  # optional package, present (the callers check)

    try:
        return HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        raise ValueError(f"{file}: cannot load tokenizer ({exc})") from None


def _chat_template(path: Path) -> Optional[ChatTemplate]:
    """The chat template of a Hugging Face directory: ``chat_template.jinja`` (where transformers 5
    saves it) or else ``tokenizer_config.json``'s ``chat_template``, a string or a list of named
    templates (``[{"name": "default", "template": ...}, ...]``, of which ``default`` is the chat's);
    the BOS/EOS tokens from ``tokenizer_config.json``. None when there is none."""
    config_file = path / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    specials = _special(config.get("bos_token")), _special(config.get("eos_token"))
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return ChatTemplate(jinja_file.read_text(encoding="utf-8"), *specials, str(jinja_file))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{jinja_file}: not UTF-8 text ({exc})") from None
    source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if not isinstance(named.get("default"), str):
            raise ValueError(f"{config_file}: chat_template lists templates {sorted(map(str, named))} "
                             "but none named 'default' (a string), which a chat uses")
        source = named["default"]
    if source is not None and not isinstance(source, str):
        raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates, "
                         f"got {describe(source)}")
    return ChatTemplate(source, *specials, str(config_file)) if source else None
