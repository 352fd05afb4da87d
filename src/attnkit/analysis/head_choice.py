"""Which head to explain: the one where a token's attention rests most on one other word.

:func:`choose_head` ranks every (layer, head) by the largest weight the token gives one other
word, passing over heads that always look a fixed distance away (:func:`fixed_offset_heads`),
and says why in one sentence. It reads only the rows a :func:`~attnkit.analysis.explain.trace`
holds: with every row held (short texts) the fixed-offset test sees the whole text, with a few
rows (long prompts) only those rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..models.tokenizer import Tokens
from .explain import LayerTrace


@dataclass(frozen=True)
class HeadChoice:
    """A (layer, head) to explain, and why, in one sentence."""

    layer: int
    head: int
    reason: str


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
    held = traces[0].rows.tolist()
    words = [i for i in held if not tokens.special[i]]
    if len(words) < 3 or len(tokens) < 2:
        return set()
    found = set()
    word_rows = [held.index(i) for i in words]
    for li, t in enumerate(traces):
        w = t.weights[:, word_rows].clone()  # (H, words, N)
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
        n, held = t.weights.shape[-1], t.rows
        index = torch.arange(len(held))
        w = t.weights.clone()  # (H, R, N)
        w[:, index, held] = -1.0
        top = w.argmax(-1)  # (H, R)
        for offset in (-3, -2, -1, 1, 2, 3):
            rows = index[(held + offset >= 0) & (held + offset < n)]  # held rows with a key at this offset
            if len(rows) < 3:
                continue
            hits = (top[:, rows] == held[rows] + offset).float().mean(-1)  # (H,)
            at_offset = t.weights[:, rows, held[rows] + offset].mean(-1)  # (H,)
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
    held = traces[0].row(token)
    visible = torch.cat([t.allowed[:, held] for t in traces]).any(0)  # (N,) in any layer or head
    visible[token] = False
    if not visible.any():  # a single token, or the first token of a causal model
        return HeadChoice(*candidates[0], f"'{tokens.labels[token]}' can see no token but itself, "
                          "so every head gives it all of its attention")
    causal = traces[0].causal
    counted = _counted_keys(tokens, token, causal, visible)
    positional = fixed_offset_heads(traces, tokens)
    skipped = [c for c in candidates if c in positional]
    if len(skipped) < len(candidates):
        candidates = [c for c in candidates if c not in positional]
    else:
        skipped = []

    def row(c: tuple[int, int]) -> torch.Tensor:
        return traces[c[0]].weights[c[1], held]

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
