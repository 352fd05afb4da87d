"""A SentencePiece BPE vocabulary from a GGUF file (``tokenizer.ggml.model = "llama"``), built on ``tokenizers``.

SentencePiece's BPE merges, at each step, the adjacent pair whose joined piece ranks best in the
vocabulary; the file lists the pieces and their scores but no merges. The merges are rebuilt from
the vocabulary: every way of cutting a piece into two pieces of the vocabulary is a merge, ranked
as the piece it makes (best score first; on a tie, the longer left part first). Characters no
piece covers fall back to the byte pieces ``<0x00>`` .. ``<0xFF>``. Spaces are written ``▁``; a
``▁`` is put before the text when ``tokenizer.ggml.add_space_prefix`` says so (default: yes).

Gemma's files (architectures ``gemma``, ``gemma2``, ``gemma3``) need two corrections, the ones
transformers applies to the same files (so ids agree with its GGUF tokenizer): their pieces of two
or more spaces are stored with real spaces and are spelled back with ``▁``, and they rank pieces by
their order in the file, not by score (Gemma's scores put byte and user-defined pieces out of merge
order).
"""

from __future__ import annotations

import os

from .gguf_file import metadata

GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
SPACE = "\u2581"


def _respell_spaces(tokens: list[str]) -> list[str]:
    """Gemma's runs of spaces (stored as ``"  "``) spelled as the pieces they are (``"▁▁"``)."""
    return [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def derive_merges(tokens: list[str], ranks: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every cut of a piece into two pieces of
    the vocabulary, ordered best first by ``ranks`` (higher is better; one per piece), then by
    the length of the left part (longer first), the right part (longer first), and the ids of
    the parts."""
    ids = {token: i for i, token in enumerate(tokens)}
    scored = {token: rank for token, rank in zip(tokens, ranks)}
    merges = []
    for token, rank in scored.items():
        cuts = [(token[:i], token[i:]) for i in range(1, len(token))]
        cuts = sorted((c for c in cuts if c[0] in ids and c[1] in ids), key=lambda c: (ids[c[0]], ids[c[1]]))
        merges.extend((-rank, -len(left), -len(right), left, right) for left, right in cuts)
    merges.sort(key=lambda m: m[:3])  # stable: equal keys keep the order above
    return [(left, right) for _, _, _, left, right in merges]


def sentencepiece_from_gguf(reader, path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` (BPE with byte fallback, without special tokens or a post
    processor, which :func:`~attnkit.models.gguf_tokenizer.tokenizer_from_gguf` adds) for the
    SentencePiece vocabulary of a GGUF ``reader``. Raises ValueError naming ``path`` when the
    tokens or their scores are missing or disagree in number."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # optional package, checked by the caller

    tokens = list(metadata(reader, path, "tokenizer.ggml.tokens", required=True))
    gemma = metadata(reader, path, "general.architecture") in GEMMA_ARCHITECTURES
    if gemma:
        tokens = _respell_spaces(tokens)
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = [float(s) for s in metadata(reader, path, "tokenizer.ggml.scores", required=True)]
        if len(ranks) != len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.scores has {len(ranks)} entries for {len(tokens)} tokens")
    unk_id = metadata(reader, path, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, derive_merges(tokens, ranks), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    prefix = metadata(reader, path, "tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tokenizer
