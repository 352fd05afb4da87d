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

The chat template (``tokenizer.chat_template``, Jinja) is rendered in a sandbox with the
settings transformers uses (``trim_blocks``, ``lstrip_blocks``, loop controls, ``raise_exception``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .gguf_file import metadata
from .gguf_sentencepiece import sentencepiece_from_gguf

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

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages`` (dicts with ``role`` and ``content``), ending with the
        assistant's turn header when ``add_generation_prompt``. Raises ValueError for a template
        error (including the template's own ``raise_exception``)."""
        # optional package (the llama extra), imported only when a template is rendered
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.source).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from None


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
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
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
        token_id = metadata(reader, path, f"tokenizer.ggml.{key}")
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


def chat_template_from_gguf(reader, path: str | os.PathLike) -> Optional[ChatTemplate]:
    """The file's :class:`ChatTemplate`, or None when it has none."""
    source = metadata(reader, path, "tokenizer.chat_template")
    if not source:
        return None
    tokens = metadata(reader, path, "tokenizer.ggml.tokens", [])

    def token(key: str) -> Optional[str]:
        token_id = metadata(reader, path, f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    return ChatTemplate(source, token("bos"), token("eos"))
