"""The seed's two steps of self-attention, measured inside a real model on a real text.

:func:`trace` runs a model once and records, for every :class:`~attnkit.nn.MultiHeadAttention`
layer and for the query rows asked for (every row by default), both steps in float64: the dot
products ``q . k`` of each row with every key, the softmax weights, the weighted sum of the
values, and the heads' own outputs as the model computed them (the input of ``o_proj``), so the
hand-made sum can be checked against what the model really did.

The weights come from the fast attention backends' log-sum-exp, for the held rows only:
``weights = exp(q . k * scale - lse)``. :func:`attnkit.attention` (``return_lse=True``) gives the
LSE of the held rows in float32; one float64 correction, ``lse += log sum exp(s - lse)`` over the
row's allowed scores, makes it exact. Nothing of size ``N x N`` is built unless every row is
held, so a long prompt costs ``rows x N`` per head, never ``N x N``.

:func:`find_token` and :func:`token_at` choose the token to explain.

Shapes: ``N`` tokens, ``R`` held rows, ``H`` query heads, ``Hkv`` key/value heads, head width
``D``, ``C`` listed keys of step 2 (the ones with the most weight).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..functional import attention
from ..models.tokenizer import Tokens
from ..nn import MultiHeadAttention
from ..patterns import Pattern

LISTED_KEYS = 16
"""Step 2 keeps the value vectors of this many keys per row and head: those with the most weight
(every key when there are no more); the rest enter the output as one summed remainder."""


@dataclass(frozen=True)
class LayerTrace:
    """One attention layer on one text (batch of 1, squeezed), for the query rows it holds.

    ``rows (R,)`` the held query positions, ascending. Step 1: ``qk (H, R, N)`` the dot products
    ``q . k`` with every key (float64, from the model's own queries and keys, after rotary);
    ``allowed (H, R, N)`` the keys the layer's pattern lets each row see; ``lse (H, R)`` the
    log-sum-exp of the allowed scaled scores, ``lse_backend (H, R)`` the fast backend's float32
    value it was refined from; ``weights (H, R, N)`` = ``exp(qk * scale - lse)`` on allowed keys,
    0 on hidden ones. Step 2: ``output (H, R, D)`` = ``weights @ values``; ``keys (H, R, C)``
    the ``C`` keys with the most weight (ascending positions), ``values (H, R, C, D)`` their
    value vectors, ``shares (H, R, C)`` the part of the output each supplies (its weighted value
    projected on the output, as a fraction of it); ``actual (H, R, D)`` the heads' outputs in the
    model's forward pass. ``pattern`` is the layer's pattern, ``scale`` its score scale. A layer
    with attention sinks (``MultiHeadAttention(sinks=True)``) has ``sink (H, R)``, its sink logit
    per row, and ``sink_weight (H, R)`` = ``exp(sink - lse)``, the share of the softmax weight the
    sink takes (``lse`` includes it; the keys' weights and ``sink_weight`` sum to 1); both None
    for a layer without sinks.
    """

    rows: torch.Tensor
    qk: torch.Tensor
    allowed: torch.Tensor
    lse: torch.Tensor
    lse_backend: torch.Tensor
    weights: torch.Tensor
    output: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    shares: torch.Tensor
    actual: torch.Tensor
    pattern: Pattern
    scale: float
    n_kv_heads: int
    sink: Optional[torch.Tensor] = None
    sink_weight: Optional[torch.Tensor] = None

    @property
    def n_heads(self) -> int:
        return self.qk.shape[0]

    @property
    def causal(self) -> bool:
        """Whether the layer's pattern hides later keys, as a decoder's does (0 may not see 1)."""
        return not bool(self.pattern.allows(torch.tensor(0), torch.tensor(1)).any())

    def kv_head(self, head: int) -> int:
        """The key/value head that query head ``head`` reads (GQA grouping)."""
        return head // (self.n_heads // self.n_kv_heads)

    def row(self, position: int) -> int:
        """The index of query ``position`` among :attr:`rows`; ValueError when it is not held."""
        found = (self.rows == position).nonzero()
        if not len(found):
            raise ValueError(f"position {position} is not among the traced rows {self.rows.tolist()}")
        return int(found[0])


def _check_rows(rows: Optional[Sequence[int]], n: int) -> torch.Tensor:
    if rows is None:
        return torch.arange(n)
    held = sorted(set(int(r) for r in rows))
    if not held or held[0] < 0 or held[-1] >= n:
        raise ValueError(f"rows must be positions 0 to {n - 1} of the text, got {list(rows)}")
    return torch.tensor(held)


@torch.no_grad()
def trace(model: nn.Module, ids: Sequence[int], rows: Optional[Sequence[int]] = None, *,
          listed: int = LISTED_KEYS) -> list[LayerTrace]:
    """Run ``model`` once on token ``ids`` and record every attention layer, in order.

    ``rows``: the query positions to hold (default: every row). A forward pre-hook on each layer
    recomputes its queries, keys and values from the layer's input with the layer's own
    projections and computes the held rows' two steps there (see the module docstring), so only
    ``R x N`` numbers per head stay behind; a pre-hook on ``o_proj`` keeps the held rows of the
    heads' outputs. ``listed``: how many keys per row keep their value vectors (``C``).
    Raises ValueError for a model without attention layers or rows outside the text.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MultiHeadAttention layers to trace")
    held = _check_rows(rows, len(ids))
    steps: dict[int, dict] = {}
    actual: dict[int, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(layers):
        def on_input(module, args, kwargs, index=index):
            x = args[0] if args else kwargs["x"]
            steps[index] = _held_rows(module, x, kwargs.get("positions"), held, listed)

        def on_heads(module, args, index=index, layer=layer):
            heads = args[0][0, held]  # (R, H * D): the held rows of the concatenated heads
            actual[index] = heads.view(len(held), layer.n_heads, layer.head_dim).transpose(0, 1).double()

        handles.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
        handles.append(layer.o_proj.register_forward_pre_hook(on_heads))
    try:
        model(torch.tensor([list(ids)], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    return [LayerTrace(rows=held, actual=actual[i], pattern=layer.pattern, n_kv_heads=layer.n_kv_heads, **steps[i])
            for i, layer in enumerate(layers)]


def _held_rows(layer: MultiHeadAttention, x: torch.Tensor, positions: Optional[torch.Tensor],
               rows: torch.Tensor, listed: int) -> dict:
    """Both steps of ``layer`` for query ``rows`` of its input ``x (1, N, C)``, in float64."""
    q, k, v = layer.project_qkv(x, positions)  # (1, H, N, D), (1, Hkv, N, D)
    n, n_heads, n_kv = x.shape[1], layer.n_heads, layer.n_kv_heads
    group, n_rows = n_heads // n_kv, len(rows)
    scale = layer.scale if layer.scale is not None else 1.0 / math.sqrt(layer.head_dim)  # as the layer's forward
    key_positions = torch.arange(n)
    sinks = None if layer.sinks is None else layer.sinks.detach()
    _, lse_backend = attention(q[:, :, rows], k, v, layer.pattern, scale=scale, q_positions=rows,
                               k_positions=key_positions, return_lse=True, sinks=sinks)  # (1, H, R): held rows only
    lse_backend = lse_backend[0].float()
    keys, values = k[0].double(), v[0].double()  # (Hkv, N, D)
    # The heads of one group are consecutive and share a key head: (Hkv, group * R, D) @ (Hkv, D, N).
    queries = q[0, :, rows].double().reshape(n_kv, group * n_rows, -1)
    qk = (queries @ keys.transpose(1, 2)).view(n_heads, n_rows, n)
    allowed = layer.pattern.rows_mask(rows, key_positions).expand(n_heads, n_rows, n)
    scores = qk * scale
    pivot = torch.where(torch.isfinite(lse_backend), lse_backend, 0.0).double()
    terms = (scores - pivot[..., None]).masked_fill(~allowed, -math.inf)  # (H, R, N)
    sink = None if sinks is None else sinks.double()[:, None].expand(n_heads, n_rows)  # (H, R)
    if sink is not None:  # one more term of the denominator, after the keys
        terms = torch.cat([terms, (sink - pivot)[..., None]], dim=-1)
    lse = pivot + torch.logsumexp(terms, dim=-1)
    weights = torch.exp(scores - lse[..., None]).masked_fill(~allowed, 0.0)
    sink_weight = None if sink is None else torch.exp(sink - lse)
    output = (weights.view(n_kv, group * n_rows, n) @ values).view(n_heads, n_rows, -1)  # step 2
    top = weights.topk(min(listed, n), dim=-1).indices.sort(dim=-1).values  # (H, R, C)
    kv_of_head = torch.arange(n_heads) // group
    listed_values = values[kv_of_head[:, None, None], top]  # (H, R, C, D)
    contributions = weights.gather(-1, top)[..., None] * listed_values
    norm = (output * output).sum(-1, keepdim=True)  # (H, R, 1); 0 only for a row that sees no key
    shares = (contributions @ output[..., None]).squeeze(-1) / torch.where(norm > 0, norm, 1.0)
    return dict(qk=qk, allowed=allowed, lse=lse, lse_backend=lse_backend, weights=weights, output=output,
                keys=top, values=listed_values, shares=shares, scale=scale, sink=sink, sink_weight=sink_weight)


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


