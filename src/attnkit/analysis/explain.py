"""The seed's two steps of self-attention, measured inside a real model on a real sentence.

:func:`trace` runs a model once and records, for every :class:`~attnkit.nn.MultiHeadAttention`
layer, the per-head queries, keys and values, the attention weights (step 1) and the heads' own
outputs as the model computed them (step 2, the input of ``o_proj``). :func:`explain_token` then
spells out both steps for one token and one head with plain arithmetic, so that its result can be
checked against what the model really did. :func:`choose_head` picks an instructive head.

Shapes: ``N`` tokens, ``H`` query heads, ``Hkv`` key/value heads, head width ``D``.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..functional import reference_attention
from ..models.bert import read_config
from ..models.tokenizer import Tokens
from ..nn import MultiHeadAttention

SUPPORTED_MODEL_TYPES = ("bert", "llama")


@dataclass(frozen=True)
class LayerTrace:
    """One attention layer on one sentence (batch of 1, squeezed).

    ``q (H, N, D)``, ``k``/``v (Hkv, N, D)`` after the projections (and rotary, when the layer
    has it); ``weights (H, N, N)`` query-by-key attention weights; ``allowed (H, N, N)`` the
    layer's pattern; ``heads_out (H, N, D)`` the per-head outputs of the model's own forward pass.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    weights: torch.Tensor
    allowed: torch.Tensor
    heads_out: torch.Tensor
    scale: float

    @property
    def n_heads(self) -> int:
        return self.q.shape[0]

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (GQA grouping)."""
        return head // (self.q.shape[0] // self.k.shape[0])


@dataclass(frozen=True)
class TokenExplanation:
    """Both steps for query ``token`` in one head, in float64.

    Step 1: ``raw (N,)`` dot products ``q . k_j``; ``scaled (N,)`` = ``raw * scale``; ``allowed (N,)``
    which keys the pattern lets the token see; ``weights (N,)`` the softmax over allowed keys.
    Step 2: ``values (N, D)``; ``contributions (N, D)`` = ``weights[j] * values[j]``; ``output (D,)``
    their sum; ``shares (N,)`` each contribution's projection on the output, as a fraction of it
    (they sum to 1); ``actual (D,)`` the head's output for the token in the model's forward pass.
    """

    layer: int
    head: int
    token: int
    raw: torch.Tensor
    scaled: torch.Tensor
    allowed: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    contributions: torch.Tensor
    output: torch.Tensor
    shares: torch.Tensor
    actual: torch.Tensor
    scale: float

    @property
    def max_error(self) -> float:
        """``max |output - actual|``: how far the hand-made step 2 is from the model's own result."""
        return float((self.output - self.actual).abs().max())


@dataclass(frozen=True)
class HeadChoice:
    """A (layer, head) to explain, and why, in one sentence."""

    layer: int
    head: int
    reason: str


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """A checkpoint directory's model (eval mode) and its ``config.json``, dispatched on ``model_type``.

    Raises FileNotFoundError for a missing directory or file, ValueError for another model type.
    """
    config = read_config(path)
    kind = check_model_type(config, path)
    if kind == "bert":
        from ..models.bert import Bert

        return Bert.from_pretrained(path), config
    if kind == "llama":
        from ..models.llama import Llama

        return Llama.from_pretrained(path).float().eval(), config


def check_model_type(config: dict, path: Path) -> str:
    """``config["model_type"]`` when explain can run it, else ValueError naming the file."""
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {kind!r} in {path / 'config.json'} is not supported; "
            f"use a {' or '.join(SUPPORTED_MODEL_TYPES)} checkpoint"
        )
    return kind


def layer_and_head_counts(config: dict) -> tuple[int, int]:
    """``(layers, heads)`` from a Hugging Face ``config.json`` dictionary."""
    try:
        return int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("config.json lacks integer num_hidden_layers / num_attention_heads") from None


def find_token(tokens: Tokens, sentence: str, wanted: Optional[str]) -> tuple[int, str]:
    """The position to explain and a note on how it was found.

    ``wanted=None`` picks the middle word of the sentence. Otherwise the first token whose label
    equals ``wanted`` (case-insensitive, ``##`` ignored) is used, else the first token of a whole
    word of the sentence equal to it. Raises ValueError naming ``--token`` and the closest tokens.
    """
    words = [i for i in range(len(tokens)) if not tokens.special[i]]
    if not words:
        raise ValueError("the sentence has no word tokens; give a few words, e.g. \"The dog chased the ball\"")
    if wanted is None:
        index = words[len(words) // 2]
        return index, "the middle word (choose another with --token)"
    key = wanted.strip().lower().removeprefix("##")
    plain = [label.removeprefix("##").lower() for label in tokens.labels]
    matches = [i for i in range(len(tokens)) if plain[i] == key]
    if not matches:
        for m in re.finditer(rf"(?<!\w){re.escape(wanted.strip())}(?!\w)", sentence, flags=re.IGNORECASE):
            matches += [i for i in words if tokens.offsets[i][0] == m.start()]
    if not matches:
        close = difflib.get_close_matches(key, [plain[i] for i in words], n=3, cutoff=0.4)
        hint = "closest: " + ", ".join(f"'{c}'" for c in dict.fromkeys(close)) if close else (
            "tokens: " + " ".join(tokens.labels[i] for i in words))
        raise ValueError(f"--token {wanted!r} is not in the sentence; {hint}")
    if len(matches) > 1:
        others = ", ".join(str(i) for i in matches[1:])
        return matches[0], f"--token (first of {len(matches)}; also at position {others})"
    return matches[0], "--token"


@torch.no_grad()
def trace(model: nn.Module, ids: Sequence[int]) -> list[LayerTrace]:
    """Run ``model`` on one sentence of token ``ids`` and record every attention layer, in order.

    Forward hooks capture each layer's input and the concatenated head outputs that enter
    ``o_proj``; queries, keys, values and weights are recomputed from the captured input with the
    layer's own projections and :func:`attnkit.reference_attention` (the explicit two steps).
    """
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention layers to trace")
    inputs: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    heads: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(layers):
        def keep_input(module, args, kwargs, index=index):
            x = args[0] if args else kwargs["x"]
            inputs[index] = (x, kwargs.get("positions"))

        def keep_heads(module, args, index=index):
            heads[index] = args[0]

        handles.append(layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        handles.append(layer.o_proj.register_forward_pre_hook(keep_heads))
    try:
        model(torch.tensor([list(ids)], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()

    traces = []
    for index, layer in enumerate(layers):
        x, positions = inputs[index]
        q, k, v = layer.project_qkv(x, positions)  # (1, H, N, D), (1, Hkv, N, D)
        _, weights = reference_attention(q, k, v, layer.pattern)  # (1, H, N, N)
        n = x.shape[1]
        allowed = layer.pattern.mask(n, n).expand(layer.n_heads, n, n)
        heads_out = heads[index].view(n, layer.n_heads, layer.head_dim).transpose(0, 1)  # (H, N, D)
        traces.append(LayerTrace(q[0], k[0], v[0], weights[0], allowed, heads_out, 1.0 / math.sqrt(q.shape[-1])))
    return traces


def explain_token(traces: Sequence[LayerTrace], layer: int, head: int, token: int) -> TokenExplanation:
    """Steps 1 and 2 for query position ``token`` in ``head`` of ``layer``, written out in float64."""
    t = traces[layer]
    kv = t.kv_head(head)
    q = t.q[head, token].double()  # (D,)
    keys, values = t.k[kv].double(), t.v[kv].double()  # (N, D)
    allowed = t.allowed[head, token]
    raw = keys @ q  # step 1: the query against every key
    scaled = raw * t.scale
    weights = torch.softmax(scaled.masked_fill(~allowed, float("-inf")), dim=0)
    contributions = weights[:, None] * values  # step 2: weight every value vector ...
    output = contributions.sum(dim=0)  # ... and add them up
    shares = contributions @ output / output.dot(output)
    return TokenExplanation(
        layer, head, token, raw, scaled, allowed, weights, values, contributions, output, shares,
        t.heads_out[head, token].double(), t.scale,
    )


def entropy_bits(weights: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of the distributions along the last axis (0 = all on one key)."""
    w = weights.double()
    return -(w * torch.log2(w.clamp_min(1e-300))).sum(-1)


def fixed_offset_heads(traces: Sequence[LayerTrace], tokens: Tokens) -> set[tuple[int, int]]:
    """(layer, head) pairs that look a fixed distance away, whatever the words.

    A head counts as positional when, for at least 80% of the sentence's word tokens (three or
    more), the key it weighs most apart from itself and the special tokens (where many heads
    rest) sits at one and the same offset (for example every token's previous token), with an
    average weight of at least 0.3 there (near-uniform heads do not count). Such heads say
    where, not what.
    """
    words = [i for i in range(len(tokens)) if not tokens.special[i]]
    if len(words) < 3 or len(tokens) < 2:
        return set()
    found = set()
    for li, t in enumerate(traces):
        w = t.weights[:, words].clone()  # (H, words, N)
        w[:, range(len(words)), words] = -1.0  # not the token itself ...
        w[..., [i for i in range(len(tokens)) if tokens.special[i]]] = -1.0  # ... nor a special token
        top_weight, top = w.max(-1)  # (H, words)
        offsets = top - torch.tensor(words)
        for h in range(t.n_heads):
            offset = int(offsets[h].mode().values)
            same = offsets[h] == offset
            if int(same.sum()) >= 0.8 * len(words) and float(top_weight[h][same].mean()) >= 0.3:
                found.add((li, h))
    return found


def choose_head(
    traces: Sequence[LayerTrace],
    tokens: Tokens,
    token: int,
    layer: Optional[int] = None,
    head: Optional[int] = None,
) -> HeadChoice:
    """The head where ``token``'s attention is most concentrated on the other words.

    The score is the weight on words other than the token itself and the special tokens
    ([CLS], [SEP], BOS), where many heads park their attention. Fixed-offset heads
    (:func:`fixed_offset_heads`) are passed over when another candidate exists. Candidates are
    every (layer, head), restricted to ``layer`` and/or ``head`` when given.
    """
    n = len(tokens)
    others = torch.tensor([j != token and not tokens.special[j] for j in range(n)])
    noun = "other words"
    if not others.any():  # a one-word sentence: the specials are all there is to look at
        noun = "other tokens"
        others = torch.tensor([j != token for j in range(n)]) if n > 1 else torch.ones(n, dtype=torch.bool)
    candidates = [(li, h) for li, t in enumerate(traces) for h in range(t.n_heads)
                  if (layer is None or li == layer) and (head is None or h == head)]
    positional = fixed_offset_heads(traces, tokens)
    skipped = [c for c in candidates if c in positional]
    if len(skipped) < len(candidates):
        candidates = [c for c in candidates if c not in positional]
    else:
        skipped = []

    def mass(c: tuple[int, int]) -> float:
        return float(traces[c[0]].weights[c[1], token][others].sum())

    li, h = max(candidates, key=mass)
    row = traces[li].weights[h, token].masked_fill(~others, -1.0)
    top = int(row.argmax())
    label = tokens.labels
    found = f"'{label[token]}' gives {mass((li, h)):.0%} of its attention to {noun} ('{label[top]}' {float(row[top]):.0%})"
    if layer is not None and head is not None:
        return HeadChoice(li, h, f"given by --layer and --head; {found}")
    where = f"any other head of layer {layer}" if layer is not None else (
        f"head {head} of any other layer" if head is not None else "any other head")
    reason = f"{found}, more than {where} does (special tokens and the token itself not counted)"
    if skipped:
        names = ", ".join(f"L{a}H{b}" for a, b in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        reason += f"; fixed-offset heads skipped: {names}"
    return HeadChoice(li, h, reason)
