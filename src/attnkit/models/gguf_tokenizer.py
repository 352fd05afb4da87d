"""The tokenizer a GGUF file describes, built on ``tokenizers``, and its chat template.

Two kinds of vocabulary are read: SentencePiece BPE (``tokenizer.ggml.model = "llama"``, as
Gemma's; see :mod:`attnkit.models.gguf_sentencepiece`, BOS added unless the file says otherwise,
as llama.cpp does) and byte-level BPE.

A byte-level BPE vocabulary (``tokenizer.ggml.model = "gpt2"``, as Llama 3, SmolLM and most recent
models use) is rebuilt from ``tokenizer.ggml.tokens`` and ``tokenizer.ggml.merges``; tokens marked
CONTROL (type 3) become special tokens and USER_DEFINED ones (type 4) plain added tokens, so both
stay whole in text. Text is split before BPE the way the vocabulary's merges were learned: the
Llama 3 expression for the ``llama-bpe`` family of ``tokenizer.ggml.pre``, GPT-2's otherwise (the
choices transformers makes for the same files, so ids agree with its GGUF tokenizer). BOS/EOS are
added when ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` say so.

The chat template (``tokenizer.chat_template``, Jinja) is rendered in a sandbox with limits
(:mod:`attnkit.models.template_sandbox`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .gguf_file import metadata, metadata_int
from .gguf_sentencepiece import sentencepiece_from_gguf
from .template_sandbox import render_template

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx", "pixtral")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (printable Latin-1 maps to itself)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    spelling = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


@dataclass(frozen=True)
class ChatTemplate:
    """A model's Jinja chat template with the special tokens it may refer to.

    ``render([{"role": "user", "content": "hi"}])`` gives the prompt text (special tokens written
    out); tokenize it without adding BOS/EOS again.
    """

    source: str
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None
    origin: Optional[str] = None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (dicts with ``role`` and ``content``), ending with the
        assistant's turn header when ``add_generation_prompt``. Raises ValueError naming
        ``origin`` (the file the template came from) for any template error, the template's own
        ``raise_exception`` included, or a limit of :mod:`attnkit.models.template_sandbox` passed."""
        return render_template(self.source, self.origin, messages=list(messages),
                               add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def tokenizer_from_gguf(reader, path: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` for the byte-level BPE or SentencePiece vocabulary in a GGUF
    ``reader`` (from :func:`~attnkit.models.gguf_file.open_gguf`). Raises ValueError naming
    ``path`` for another tokenizer model or missing metadata, ImportError naming the extra without
    ``tokenizers``."""
    try:  # optional package (the llama extra), imported only when a tokenizer is built
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ImportError('a GGUF tokenizer needs tokenizers: pip install -e ".[llama]"') from None
    kind = metadata(reader, path, "tokenizer.ggml.model", required=True)
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (attnkit reads byte-level BPE, "
                         "'gpt2', and SentencePiece BPE, 'llama')")
    tokens = metadata(reader, path, "tokenizer.ggml.tokens", required=True)
    types = metadata(reader, path, "tokenizer.ggml.token_type", [])
    if kind == "llama":
        tokenizer = sentencepiece_from_gguf(reader, path)
        # A user-defined token stays whole when the vocabulary holds it as written (Gemma's "\n");
        # Gemma's runs of spaces are respelled, and BPE joins them.
        vocab = tokenizer.get_vocab()
        plain = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
        return _with_special_tokens(tokenizer, reader, path, tokens, types, plain, bos_default=True)
    merges = metadata(reader, path, "tokenizer.ggml.merges", required=True)
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # A token written with characters outside the byte alphabet (a space, say) is respelled in it.
    vocab = {
        token if set(token) <= letters else "".join(alphabet[b] for b in token.encode("utf-8")): i
        for i, token in enumerate(tokens)
    }
    # A control token keeps its own text too, so a template that writes it out maps to its id.
    vocab.update({t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL and t not in vocab})
    tokenizer = Tokenizer(models.BPE(vocab, _merge_pairs(merges, path), fuse_unk=False))
    pre = metadata(reader, path, "tokenizer.ggml.pre")
    if pre in _LLAMA3_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    plain = [t for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab]
    return _with_special_tokens(tokenizer, reader, path, tokens, types, plain, bos_default=False)


def _with_special_tokens(tokenizer, reader, path, tokens: list[str], types: list[int], plain: list[str], *,
                         bos_default: bool):
    """``tokenizer`` with the CONTROL tokens as special tokens, ``plain`` as added tokens that stay
    whole, and BOS / EOS added as the file's flags say (BOS: ``bos_default`` when it says nothing)."""
    from tokenizers import AddedToken, processors  # optional package, present (the caller imported it)

    control = [t for t, kind in zip(tokens, types) if kind == CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in plain])
    template, specials = [], []
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        token_id = token_id_of(reader, path, key, tokens)
        default = bos_default if flag == "add_bos_token" else False
        if metadata(reader, path, f"tokenizer.ggml.{flag}", default) and token_id is not None:
            specials.append((tokens[token_id], token_id))
            template.append(tokens[token_id])
            if flag == "add_bos_token":
                template.append("$A")
    if specials:
        if "$A" not in template:
            template.insert(0, "$A")
        tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)
    return tokenizer


def token_id_of(reader, path: str | os.PathLike, key: str, tokens: Sequence[str]) -> Optional[int]:
    """Metadata ``tokenizer.ggml.{key}`` (``bos_token_id``, ...), None when absent; ValueError naming
    the file and key unless it is an integer id of one of ``tokens``."""
    token_id = metadata_int(reader, path, f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= token_id < len(tokens):
        raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.{key} is {token_id}, "
                         f"not the id of one of the {len(tokens)} tokens of tokenizer.ggml.tokens")
    return token_id


def _merge_pairs(merges: Sequence[str], path: str | os.PathLike) -> list[tuple[str, str]]:
    """``tokenizer.ggml.merges`` (``"Ġ t"``: two tokens and a space) as pairs; ValueError naming
    the file and the first merge without a space."""
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"{path}: GGUF metadata tokenizer.ggml.merges entry {i} ({merges[i]!r}) "
                             "is not two tokens separated by a space")
    return pairs


def chat_template_from_gguf(reader, path: str | os.PathLike) -> Optional[ChatTemplate]:
    """The file's :class:`ChatTemplate`, or None when it has none."""
    source = metadata(reader, path, "tokenizer.chat_template")
    if not source:
        return None
    tokens = metadata(reader, path, "tokenizer.ggml.tokens", [])

    def token(key: str) -> Optional[str]:
        token_id = token_id_of(reader, path, f"{key}_token_id", tokens)
        return None if token_id is None else tokens[token_id]

    return ChatTemplate(source, token("bos"), token("eos"), str(path))
