"""Test helper: a word-level tokenizer.json for tiny checkpoints ("w0" ... "w255" are ids 0-255)."""

from __future__ import annotations

from pathlib import Path

import pytest


def save_word_tokenizer(directory: Path) -> None:
    """Write ``directory/tokenizer.json``: whitespace-separated words ``w<i>`` map to id ``i``
    (unknown words to 0). Skips the test when ``tokenizers`` is missing."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(Path(directory) / "tokenizer.json"))
