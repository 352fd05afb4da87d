""":func:`explain_text`: run a checkpoint on a text and return the explain dict (:mod:`.explain_data`).

What ``attnkit explain`` does before it shows anything, as one function: recognise the
checkpoint, check the choices against its size, tokenise, generate when asked, decide which rows
to hold, trace them, choose the head.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from ..models.catalog import resolve_model
from ..models.generate import generate as generate_tokens
from ..models.registry import identify
from ..models.tokenizer import Tokenizer
from . import explain as ex
from .explain_data import every_row_fits, explanation
from .head_choice import choose_head

DEFAULT_MODEL = "all-minilm-l6-v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
TEXT_HINT = 'attnkit explain "The dog chased the ball"'


def _check_index(name: str, value: Optional[int], count: int, what: str) -> None:
    if value is not None and not 0 <= value < count:
        raise ValueError(f"{name} {value} is out of range: the model has {count} {what}, numbered 0 to {count - 1}")


def explain_text(
    text: str,
    *,
    model: Optional[str | os.PathLike] = None,
    token: Optional[str] = None,
    positions: Sequence[int] = (),
    layer: Optional[int] = None,
    head: Optional[int] = None,
    generate: int = 0,
) -> dict:
    """Run ``model`` on ``text`` and return the explain dict.

    Args:
        text: the text to run through the model.
        model: a model name (:data:`attnkit.models.catalog.MODELS`), a Hugging Face BERT or
            Llama checkpoint directory or a Llama ``.gguf`` file; default all-MiniLM-L6-v2 (the
            ``demo`` extra).
        token: ``WORD`` or ``WORD:K`` (its K-th occurrence), the token explained first; default
            the first of ``positions``, else the first generated token, else the middle word.
        positions: token positions (numbered over the text's tokens, then the generated ones)
            whose rows the dict holds even when the text is too long to hold every row.
        layer, head: restrict the automatic head choice (numbered from 0).
        generate: greedy tokens to generate after the text first (causal models only); they and
            the last prompt token, whose row predicted the first of them, are held rows.
    Raises:
        ValueError: an empty text, a token or position not in the text, ``token`` with
            ``positions``, a layer or head out of range, ``generate`` negative or with an
            encoder, an unreadable checkpoint (as :func:`attnkit.models.registry.identify`).
        FileNotFoundError, ImportError: a missing checkpoint or tokenizer, or package for it.
    """
    text = text.strip()
    if not text:
        raise ValueError(f"the sentence is empty; give a few words, e.g. {TEXT_HINT}")
    if token is not None and positions:
        raise ValueError("give --token or --position, not both")
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 0:
        raise ValueError(f"--generate must be a number of tokens, 0 or more; got {generate!r}")
    checkpoint = identify(resolve_model(None if model is None else str(model), default=DEFAULT_MODEL))
    n_layers, n_heads = checkpoint.layers_and_heads()
    _check_index("--layer", layer, n_layers, "layers")
    _check_index("--head", head, n_heads, "heads per layer")
    if generate and not checkpoint.family.causal:
        raise ValueError(f"--generate needs a causal model; {checkpoint.path} holds a {checkpoint.family.name} "
                         "encoder, which cannot generate text")
    tokenizer = Tokenizer(checkpoint.source)
    tokens = tokenizer(text)
    chosen = ex.find_token(tokens, text, token) if token is not None else None
    prompt_tokens, net = len(tokens), None
    if generate:  # positions may name generated tokens: they are checked once these exist
        net = checkpoint.load(dtype=torch.float32)
        tokens = tokenizer.append(tokens, generate_tokens(net, [tokens.ids], generate)[0][prompt_tokens:])
    generated = list(range(prompt_tokens, len(tokens)))
    held = [ex.token_at(tokens, p)[0] for p in positions]
    if chosen is None:
        if held:
            chosen = held[0], "--position"
        elif generated:
            chosen = generated[0], "the first generated token (choose another with --token or --position)"
        else:
            chosen = ex.find_token(tokens, text, None)
    rows = None
    if not every_row_fits(n_layers, n_heads, len(tokens)):
        rows = [chosen[0], *held, *generated] + ([prompt_tokens - 1] if generated else [])
    traces = ex.trace(net or checkpoint.load(dtype=torch.float32), tokens.ids, rows)
    choice = choose_head(traces, tokens, chosen[0], layer, head)
    name = DEFAULT_MODEL_NAME if model is None else str(model)
    return explanation(traces, tokens, text=text, token=chosen[0], token_note=chosen[1], choice=choice,
                       name=name, family=checkpoint.family.name, prompt_tokens=prompt_tokens)
