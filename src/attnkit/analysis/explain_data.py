"""The explain data: one plain dict that every view of ``attnkit explain`` shows.

:func:`explanation` turns the traces of a text (:func:`~attnkit.analysis.explain.trace`) into the
dict; :func:`~attnkit.analysis.explain_run.explain` runs a checkpoint and returns it. The
terminal tables (``attnkit explain``), the PNG heatmaps (:mod:`.heatmaps`) and the HTML page
(:mod:`.explain_page`) are three views of it, and a new kind of model adds to step 1 through it
(per-layer patterns, extra step-1 rows). Its layout, with ``L`` layers, ``H`` query heads, ``R``
held query rows, ``N`` tokens, ``C`` listed keys and ``D`` the head width (tensors are float64
unless said otherwise):

- ``"model"``: ``name``, ``family``, ``causal``, ``n_layers``, ``n_heads``, ``n_kv_heads``,
  ``head_dim``, ``attention`` (``"MHA"``, ``"GQA"`` or ``"MQA"``), ``heads`` (a phrase: "9 query
  heads in 3 groups sharing 3 KV heads"), ``groups`` (the query heads of each KV head).
- ``"layers"``: one dict per layer: ``pattern`` (a label: ``"full"``, ``"causal"``,
  ``"window 512"``), ``kind`` (``"global"``, ``"window"`` or ``"sparse"``), ``scale``.
- ``"notes"``: sentences any view may show: ``heads`` (what the head layout means), ``patterns``
  (which keys the layers hide), ``rows`` (which rows are held, and why).
- ``"text"``; ``"tokens"``: ``labels``, ``ids``, ``special``, ``generated`` (lists of N);
  ``"prompt_tokens"``: how many of the N come from the text.
- ``"rows"``: the held query positions (R, ascending); ``"every_row"``: whether R == N.
- ``"token"``, ``"token_note"``: the position explained first and how it was chosen;
  ``"layer"``, ``"head"``, ``"head_note"``: the head explained first and why.
- ``"step1"``: ``qk (L, H, R, N)`` the dot products ``q . k``, ``allowed (L, H, R, N)`` bool,
  ``weights (L, H, R, N)`` (0 where hidden), ``lse (L, H, R)``, ``lse_backend (L, H, R)``
  float32, and ``extra``: a list of extra step-1 rows, each ``{"label", "scores" (L, H, R),
  "weights" (L, H, R)}`` for softmax weight that goes to no key: the keys' weights and the extra
  rows' weights sum to 1. A model with attention sinks has one, ``"sink"``: its scores are the
  sink logits (on the scale of the scaled scores), its weights the sink's share (:func:`sink_rows`;
  a layer without sinks gives scores ``-inf`` and weights 0).
- ``"step2"``: ``output (L, H, R, D)`` = sum of weight x value, ``actual (L, H, R, D)`` the
  heads' outputs in the model's own forward pass, ``keys (L, H, R, C)`` int64 the listed keys
  (most weight, ascending), ``values (L, H, R, C, D)`` their value vectors, ``shares (L, H, R, C)``
  the part of the output each supplies.

:func:`token_step` reads one (layer, head, token) out of the dict for a view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..models.tokenizer import Tokens
from ..patterns import Causal, Full, Pattern, SlidingWindow
from .explain import LayerTrace
from .head_choice import HeadChoice

SCHEMA = "attnkit.explain/1"

EVERY_ROW_PAIRS = 1 << 19
"""Every row is held while ``layers x heads x N x N`` stays within this many (query, key) pairs
(MiniLM: up to 85 tokens; SmolLM2: 44); above, only the rows asked for, so the data and the page
stay small at any length."""


def attention_kind(n_heads: int, n_kv_heads: int) -> str:
    """``"MHA"`` (every head its own keys and values), ``"MQA"`` (one KV head for several query
    heads) or ``"GQA"`` (groups of query heads, one KV head each)."""
    if n_kv_heads == n_heads:
        return "MHA"
    return "MQA" if n_kv_heads == 1 else "GQA"


def heads_phrase(n_heads: int, n_kv_heads: int) -> str:
    """The head layout in a few words: "12 heads", "9 query heads in 3 groups sharing 3 KV heads",
    "4 query heads sharing 1 KV head"."""
    kind = attention_kind(n_heads, n_kv_heads)
    if kind == "MHA":
        return f"{n_heads} head{'s' if n_heads > 1 else ''}"
    if kind == "MQA":
        return f"{n_heads} query heads sharing 1 KV head"
    return f"{n_heads} query heads in {n_kv_heads} groups sharing {n_kv_heads} KV heads"


def head_groups(n_heads: int, n_kv_heads: int) -> list[list[int]]:
    """The query heads that read each KV head: head ``h`` reads KV head ``h // (H / Hkv)``."""
    size = n_heads // n_kv_heads
    return [list(range(g * size, (g + 1) * size)) for g in range(n_kv_heads)]


def _span(heads: Sequence[int]) -> str:
    return f"{heads[0]}–{heads[-1]}" if len(heads) > 1 else str(heads[0])


def heads_note(n_heads: int, n_kv_heads: int, head_dim: int) -> str:
    """What the head layout means, in the seed's terms (MHA, GQA or MQA)."""
    kind = attention_kind(n_heads, n_kv_heads)
    concat = (f"their {n_heads} outputs ({n_heads} × {head_dim} numbers) are concatenated and "
              "projected back by o_proj")
    if kind == "MHA":
        return f"each head has its own query, key and value projections; {concat}"
    if kind == "MQA":
        return (f"multi-query attention: {heads_phrase(n_heads, n_kv_heads)}: each head has its own "
                f"query projection, all {n_heads} share one key and one value projection, so they score "
                f"the same keys with different queries and blend the same values; {concat}")
    groups = head_groups(n_heads, n_kv_heads)
    spans = ", ".join(_span(g) for g in groups[:-1]) + f" and {_span(groups[-1])}"
    return (f"grouped-query attention: {heads_phrase(n_heads, n_kv_heads)}: each head has its own query "
            f"projection; heads {spans} share the key and value projections of KV heads "
            f"0 to {n_kv_heads - 1}, so the heads of a group score the same keys with different queries "
            f"and blend the same values; {concat}")


def pattern_label(pattern: Pattern) -> tuple[str, str]:
    """``(label, kind)`` of a layer's pattern: ``("full", "global")``, ``("causal", "global")``,
    ``("window 512", "window")`` for ``SlidingWindow(512)`` (the 512 most recent keys), or the
    pattern's class name and ``"sparse"`` for any other pattern."""
    if isinstance(pattern, (Full, Causal)):
        return type(pattern).__name__.lower(), "global"
    if isinstance(pattern, SlidingWindow):
        return (f"window {pattern.size}" if pattern.causal else f"window ±{pattern.size - 1}"), "window"
    return type(pattern).__name__, "sparse"


def patterns_note(labels: Sequence[str], kinds: Sequence[str], causal: bool) -> str:
    """Which keys the layers hide, in one sentence."""
    base = ("causal: a token sees itself and earlier tokens" if causal
            else "bidirectional: every token sees every token")
    if len(set(labels)) == 1 and kinds[0] == "global":
        return base
    by_label: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    layers = "; ".join(f"layer{'s' if len(ix) > 1 else ''} {_ranges(ix)}: {label}" for label, ix in by_label.items())
    return (f"{layers}. A window layer sees only the most recent keys (itself included): the keys it "
            "hides are marked hidden, not given zero weight; a global layer sees every earlier token")


def _ranges(indices: Sequence[int]) -> str:
    runs, start = [], indices[0]
    for previous, current in zip(indices, [*indices[1:], None]):
        if current != previous + 1:
            runs.append(str(start) if start == previous else f"{start}–{previous}")
            start = current
    return ", ".join(runs)


def every_row_fits(n_layers: int, n_heads: int, n_tokens: int) -> bool:
    """Whether every query row is held for a text of ``n_tokens`` (:data:`EVERY_ROW_PAIRS`)."""
    return n_layers * n_heads * n_tokens * n_tokens <= EVERY_ROW_PAIRS


def rows_note(rows: Sequence[int], n_tokens: int, every_row: bool) -> str:
    if every_row:
        return f"every token's row is held ({n_tokens} tokens): choose any token"
    shown = ", ".join(map(str, rows[:12])) + (", ..." if len(rows) > 12 else "")
    return (f"the text has {n_tokens} tokens, too many to hold every row: the rows of positions {shown} "
            "are held (--position, and with --generate the generated tokens), each computed exactly "
            "from the attention backend's log-sum-exp without an N × N matrix")


def explanation(
    traces: Sequence[LayerTrace],
    tokens: Tokens,
    *,
    text: str,
    token: int,
    token_note: str,
    choice: HeadChoice,
    name: str,
    family: str,
    prompt_tokens: Optional[int] = None,
) -> dict:
    """The explain dict (layout in the module docstring) of ``traces`` over ``tokens``.

    ``token``/``token_note`` and ``choice`` say what is explained first; ``prompt_tokens`` (default
    every token) how many tokens come from the text, the rest being generated. Raises ValueError
    when ``token`` is not a held row.
    """
    first = traces[0]
    first.row(token)
    n_heads, n_kv, head_dim = first.n_heads, first.n_kv_heads, first.output.shape[-1]
    n = len(tokens)
    prompt_tokens = n if prompt_tokens is None else prompt_tokens
    labels, kinds = zip(*(pattern_label(t.pattern) for t in traces))
    causal = first.causal
    rows = first.rows.tolist()

    def stack(field: str) -> torch.Tensor:
        return torch.stack([getattr(t, field) for t in traces])

    return {
        "schema": SCHEMA,
        "model": {"name": name, "family": family, "causal": causal, "n_layers": len(traces), "n_heads": n_heads,
                  "n_kv_heads": n_kv, "head_dim": head_dim, "attention": attention_kind(n_heads, n_kv),
                  "heads": heads_phrase(n_heads, n_kv), "groups": head_groups(n_heads, n_kv)},
        "layers": [{"pattern": label, "kind": kind, "scale": t.scale} for label, kind, t in zip(labels, kinds, traces)],
        "notes": {"heads": heads_note(n_heads, n_kv, head_dim), "patterns": patterns_note(labels, kinds, causal),
                  "rows": rows_note(rows, n, len(rows) == n)},
        "text": text,
        "tokens": {"labels": list(tokens.labels), "ids": list(tokens.ids), "special": list(tokens.special),
                   "generated": [i >= prompt_tokens for i in range(n)]},
        "prompt_tokens": prompt_tokens,
        "rows": rows,
        "every_row": len(rows) == n,
        "token": token,
        "token_note": token_note,
        "layer": choice.layer,
        "head": choice.head,
        "head_note": choice.reason,
        "step1": {"qk": stack("qk"), "allowed": stack("allowed"), "weights": stack("weights"),
                  "lse": stack("lse"), "lse_backend": stack("lse_backend"), "extra": sink_rows(traces)},
        "step2": {"output": stack("output"), "actual": stack("actual"), "keys": stack("keys"),
                  "values": stack("values"), "shares": stack("shares")},
    }


def sink_rows(traces: Sequence[LayerTrace]) -> list[dict]:
    """The step-1 extra rows of ``traces``: ``[{"label": "sink", "scores" (L, H, R), "weights"
    (L, H, R)}]`` when some layer has attention sinks (a layer without gives scores ``-inf`` and
    weights 0), else none."""
    if all(t.sink is None for t in traces):
        return []
    shape = traces[0].lse.shape
    scores = [t.sink if t.sink is not None else torch.full(shape, -math.inf, dtype=torch.float64) for t in traces]
    weights = [t.sink_weight if t.sink is not None else torch.zeros(shape, dtype=torch.float64) for t in traces]
    return [{"label": "sink", "scores": torch.stack(scores), "weights": torch.stack(weights)}]


@dataclass(frozen=True)
class TokenStep:
    """Both steps for one query ``token`` in one ``head`` of one ``layer``, read from the dict.

    Step 1: ``raw (N,)`` the dot products ``q . k``, ``scaled (N,)`` = ``raw * scale``,
    ``allowed (N,)``, ``weights (N,)``, ``lse``; ``extra``: ``(label, score, weight)`` of each
    extra step-1 row this layer has (a score of ``-inf`` means none, as for a layer without sinks). Step 2: ``keys (C,)`` the listed keys, ``values (C, D)``,
    ``contributions (C, D)`` = weight x value, ``shares (C,)``; ``rest (D,)`` the summed
    contributions of the other keys and ``rest_share`` their share; ``output (D,)``;
    ``actual (D,)`` the head's output in the model's forward pass.
    """

    layer: int
    head: int
    token: int
    raw: torch.Tensor
    scaled: torch.Tensor
    allowed: torch.Tensor
    weights: torch.Tensor
    lse: float
    extra: list[tuple[str, float, float]]
    keys: torch.Tensor
    values: torch.Tensor
    contributions: torch.Tensor
    shares: torch.Tensor
    rest: torch.Tensor
    rest_share: float
    output: torch.Tensor
    actual: torch.Tensor
    scale: float

    @property
    def max_error(self) -> float:
        """``max |output - actual|``: how far the hand-made step 2 is from the model's own result."""
        return float((self.output - self.actual).abs().max())


def token_step(data: dict, layer: int, head: int, token: int) -> TokenStep:
    """Steps 1 and 2 of query position ``token`` in ``head`` of ``layer``, from the explain dict.
    Raises ValueError when ``token`` is not a held row."""
    if token not in data["rows"]:
        raise ValueError(f"position {token} is not a held row of this explanation (rows: {data['rows']})")
    r = data["rows"].index(token)
    s1, s2 = data["step1"], data["step2"]
    scale = data["layers"][layer]["scale"]
    raw = s1["qk"][layer, head, r]
    weights = s1["weights"][layer, head, r]
    keys, values = s2["keys"][layer, head, r], s2["values"][layer, head, r]
    contributions = weights[keys][:, None] * values
    shares, output = s2["shares"][layer, head, r], s2["output"][layer, head, r]
    extra = [(e["label"], float(e["scores"][layer, head, r]), float(e["weights"][layer, head, r]))
             for e in s1["extra"] if e["scores"][layer, head, r] > -math.inf]  # -inf: none in this layer
    return TokenStep(
        layer, head, token, raw, raw * scale, s1["allowed"][layer, head, r], weights,
        float(s1["lse"][layer, head, r]), extra, keys, values, contributions, shares,
        output - contributions.sum(0), 1.0 - float(shares.sum()), output, s2["actual"][layer, head, r], scale,
    )


def top_keys(weights: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` positions of ``weights (N,)`` with the most weight, ascending (every position
    when there are no more)."""
    if count >= len(weights):
        return torch.arange(len(weights))
    return weights.topk(count).indices.sort().values
