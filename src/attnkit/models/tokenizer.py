"""A checkpoint's ``tokenizer.json`` (or a GGUF file's tokenizer) through the ``tokenizers`` library,
with readable token labels.

Works for WordPiece (BERT) and byte-level BPE (Llama) files alike. Padding and truncation settings
stored in the file are switched off: a sentence becomes exactly its tokens, specials included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


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
    or a ``.gguf`` file (see :mod:`attnkit.models.gguf_tokenizer`).

    Raises FileNotFoundError when the file is missing and ImportError (with the install command)
    when the ``tokenizers`` package is not installed.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.suffix.lower() == ".gguf":
            from .gguf_checkpoint import open_gguf
            from .gguf_tokenizer import tokenizer_from_gguf

            self._tok = tokenizer_from_gguf(open_gguf(path), path)
            return
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {file.parent}")
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ImportError('reading tokenizer.json needs tokenizers: pip install -e ".[demo]"') from None
        self._tok = HFTokenizer.from_file(str(file))
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
