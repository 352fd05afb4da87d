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
from typing import Optional, Sequence

import torch
from torch import nn

from ..functional import reference_attention
from ..models.tokenizer import Tokens
from ..nn import MultiHeadAttention


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


def find_token(tokens: Tokens, sentence: str, wanted: Optional[str]) -> tuple[int, str]:
    """The position to explain and a note on how it was found.

    ``wanted=None`` picks the middle word of the sentence. Otherwise the first token whose label
    equals ``wanted`` (case-insensitive, ``##`` ignored) is used, else the first token of a whole
    word of the sentence equal to it; ``WORD:K`` asks for the K-th occurrence (from 1), so
    ``the:2`` is the second "the". Raises ValueError naming ``--token`` and the closest tokens,
    or how often the word occurs when K is too large.
    """
    words = [i for i in range(len(tokens)) if not tokens.special[i]]
    if not words:
        raise ValueError("the sentence has no word tokens; give a few words, e.g. \"The dog chased the ball\"")
    if wanted is None:
        index = words[len(words) // 2]
        return index, "the middle word (choose another with --token or --position)"
    matches = _occurrences(tokens, sentence, wanted)
    occurrence = _OCCURRENCE.match(wanted.strip())
    if not matches and occurrence:
        word, nth = occurrence["word"], int(occurrence["nth"])
        matches = _occurrences(tokens, sentence, word)
        if matches and not 1 <= nth <= len(matches):
            raise ValueError(
                f"--token {wanted!r}: {word!r} occurs {len(matches)} time{'s' if len(matches) > 1 else ''} "
                f"(position {', '.join(map(str, matches))}); use {word}:1 to {word}:{len(matches)}")
        if matches:
            return matches[nth - 1], f"--token (occurrence {nth} of {len(matches)})"
        wanted = word
    if not matches:
        key = wanted.strip().lower().removeprefix("##")
        plain = [tokens.labels[i].removeprefix("##").lower() for i in words]
        close = difflib.get_close_matches(key, plain, n=3, cutoff=0.4)
        hint = "closest: " + ", ".join(f"'{c}'" for c in dict.fromkeys(close)) if close else (
            "tokens: " + " ".join(tokens.labels[i] for i in words))
        raise ValueError(f"--token {wanted!r} is not in the sentence; {hint}")
    if len(matches) > 1:
        others = ", ".join(str(i) for i in matches[1:])
        word = wanted.strip()
        return matches[0], (f"--token (first of {len(matches)}; also at position {others}: "
                            f"--token {word}:2 or --position {matches[1]} picks the next)")
    return matches[0], "--token"


_OCCURRENCE = re.compile(r"^(?P<word>.+):(?P<nth>\d+)$")


def _occurrences(tokens: Tokens, sentence: str, wanted: str) -> list[int]:
    """Positions of the tokens that are ``wanted``: equal labels, else the first token of each
    whole-word match in the sentence (a word split into pieces)."""
    key = wanted.strip().lower().removeprefix("##")
    matches = [i for i, label in enumerate(tokens.labels) if label.removeprefix("##").lower() == key]
    if not matches and wanted.strip():
        for m in re.finditer(rf"(?<!\w){re.escape(wanted.strip())}(?!\w)", sentence, flags=re.IGNORECASE):
            matches += [i for i in range(len(tokens)) if not tokens.special[i] and tokens.offsets[i][0] == m.start()]
    return matches


def token_at(tokens: Tokens, position: int) -> tuple[int, str]:
    """``position`` (as numbered on the ``tokens:`` line) when the sentence has it, else ValueError."""
    if not 0 <= position < len(tokens):
        raise ValueError(f"--position {position} is out of range: the sentence has {len(tokens)} tokens, "
                         f"numbered 0 to {len(tokens) - 1}")
    return position, "--position"


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

    Two tests, either suffices. Among the sentence's word tokens (three or more): for at least
    80% of them the key weighed most apart from itself and the special tokens (where many heads
    rest) sits at one and the same offset, with an average weight of at least 0.3 there. Among
    all tokens (so that it also holds in a sentence of three words, "!!!"): for at least 80% of
    the rows that have a key at some offset within 3, the key weighed most apart from the token
    itself is that one, again with an average weight of at least 0.3. Near-uniform heads never
    qualify. Such heads say where, not what.
    """
    return _word_offset_heads(traces, tokens) | _token_offset_heads(traces)


def _word_offset_heads(traces: Sequence[LayerTrace], tokens: Tokens) -> set[tuple[int, int]]:
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


def _token_offset_heads(traces: Sequence[LayerTrace]) -> set[tuple[int, int]]:
    found = set()
    for li, t in enumerate(traces):
        n = t.weights.shape[-1]
        w = t.weights.clone()  # (H, N, N)
        w[:, range(n), range(n)] = -1.0
        top = w.argmax(-1)  # (H, N)
        for offset in (-3, -2, -1, 1, 2, 3):
            first, end = max(0, -offset), min(n, n - offset)  # rows that have a key at this offset
            if end - first < 3:
                continue
            rows = torch.arange(first, end)
            hits = (top[:, rows] == rows + offset).float().mean(-1)  # (H,)
            at_offset = t.weights[:, rows, rows + offset].mean(-1)  # (H,)
            found |= {(li, h) for h in range(t.n_heads) if hits[h] >= 0.8 and at_offset[h] >= 0.3}
    return found


CONCENTRATED = 0.25
"""A head looks at a word when it gives that one word at least this share of the token's attention."""


@dataclass(frozen=True)
class _Counted:
    """The keys whose weight counts for the choice: ``keys (N,)`` bool, the ``noun`` for them,
    what is left out (for the reason) and why each left-out key was left out."""

    keys: torch.Tensor
    noun: str
    left_out: str
    why: dict[int, str]


def _counted_keys(tokens: Tokens, token: int, causal: bool, visible: torch.Tensor) -> _Counted:
    """Other words the token can see (``visible (N,)``, at least one key besides the token): not
    the token itself, not a special token, not punctuation, and in a causal model not the first
    token, on which such models park the attention they do not need (an attention sink: it holds
    most of many heads' weight whatever the text). A sentence without such words falls back to
    other tokens."""
    n, labels = len(tokens), tokens.labels
    why = {j: "a special token" for j in range(n) if tokens.special[j]}
    sink = causal and token != 0 and not tokens.special[0]
    if sink:
        why[0] = "the first token, where causal models park spare attention"
    why[token] = "the token itself"
    sink_text = ", the first token (where causal models park spare attention)" if sink else ""
    punctuation = {j for j in range(n) if j not in why and not any(c.isalnum() for c in labels[j])}
    words = torch.tensor([j not in why and j not in punctuation for j in range(n)]) & visible
    if words.any():
        why.update({j: "punctuation" for j in punctuation})
        return _Counted(words, "word", f"special tokens, punctuation, the token itself{sink_text}", why)
    others = torch.tensor([j not in why for j in range(n)]) & visible
    if others.any():
        return _Counted(others, "token", f"special tokens, the token itself{sink_text}", why)
    others = torch.tensor([j != token for j in range(n)]) & visible
    return _Counted(others, "token", "the token itself", {token: "the token itself"})


def choose_head(
    traces: Sequence[LayerTrace],
    tokens: Tokens,
    token: int,
    layer: Optional[int] = None,
    head: Optional[int] = None,
) -> HeadChoice:
    """The head where ``token``'s attention is most concentrated on one other word.

    A head's score is the largest weight ``token`` gives to a single other word: the token
    itself, special tokens ([CLS], [SEP], BOS), punctuation and, in a causal model, the first
    token (the attention sink) are not counted, since many heads park their attention there
    whatever the text. Ranking by one word's weight rather than the total on other words keeps
    near-uniform heads out: spread over a long sentence, they give every word a little.
    Fixed-offset heads (:func:`fixed_offset_heads`) are passed over when another candidate
    exists. Candidates are every (layer, head), restricted to ``layer`` and/or ``head`` when
    given. When no candidate gives one word :data:`CONCENTRATED` of the weight, the reason says
    so, and where the weight went instead.
    """
    candidates = [(li, h) for li, t in enumerate(traces) for h in range(t.n_heads)
                  if (layer is None or li == layer) and (head is None or h == head)]
    visible = torch.cat([t.allowed[:, token] for t in traces]).any(0)  # (N,) in any layer or head
    visible[token] = False
    if not visible.any():  # a single token, or the first token of a causal model
        return HeadChoice(*candidates[0], f"'{tokens.labels[token]}' can see no token but itself, "
                          "so every head gives it all of its attention")
    causal = not bool(traces[0].allowed.all())
    counted = _counted_keys(tokens, token, causal, visible)
    positional = fixed_offset_heads(traces, tokens)
    skipped = [c for c in candidates if c in positional]
    if len(skipped) < len(candidates):
        candidates = [c for c in candidates if c not in positional]
    else:
        skipped = []

    def row(c: tuple[int, int]) -> torch.Tensor:
        return traces[c[0]].weights[c[1], token]

    def peak(c: tuple[int, int]) -> float:
        return float(row(c)[counted.keys].max())

    li, h = max(candidates, key=peak)
    found = _describe(row((li, h)), tokens, token, counted)
    if layer is not None and head is not None:
        return HeadChoice(li, h, f"given by --layer and --head; {found}")
    where = f"any other head of layer {layer}" if layer is not None else (
        f"head {head} of any other layer" if head is not None else "any other head")
    scope = f"layer {layer}" if layer is not None else (f"head {head} of any layer" if head is not None else "any layer")
    if peak((li, h)) >= CONCENTRATED:
        reason = f"{found}, more than {where} gives one other {counted.noun} ({counted.left_out} not counted)"
    else:
        reason = (f"no head of {scope} gives {CONCENTRATED:.0%} of '{tokens.labels[token]}''s attention to one "
                  f"other {counted.noun} ({counted.left_out} not counted); this one comes closest: {found}")
    if skipped:
        names = ", ".join(f"L{a}H{b}" for a, b in skipped[:4]) + (", ..." if len(skipped) > 4 else "")
        reason += f"; fixed-offset heads skipped: {names}"
    return HeadChoice(li, h, reason)


def _describe(weights: torch.Tensor, tokens: Tokens, token: int, counted: _Counted) -> str:
    """One true sentence about a head's ``weights (N,)`` for ``token``: the counted key it weighs
    most, the total on counted keys, and where the weight went when it is not concentrated."""
    labels = tokens.labels

    def name(j: int) -> str:
        return f"'{labels[j]}'" + (f" at position {j}" if labels.count(labels[j]) > 1 else "")

    masked = weights.masked_fill(~counted.keys, -1.0)
    top = int(masked.argmax())
    text = (f"'{labels[token]}' gives {float(weights[top]):.0%} of its attention to {name(top)} "
            f"({float(weights[counted.keys].sum()):.0%} to other {counted.noun}s in all)")
    if float(weights[top]) >= CONCENTRATED:
        return text
    heaviest = int(weights.argmax())
    if heaviest in counted.why and float(weights[heaviest]) >= 0.5:
        return f"{text}; {float(weights[heaviest]):.0%} rests on {name(heaviest)}, {counted.why[heaviest]}"
    bits = float(entropy_bits(weights))
    return f"{text}; entropy {bits:.2f} bits, as spread out as {2 ** bits:.0f} equal weights"
