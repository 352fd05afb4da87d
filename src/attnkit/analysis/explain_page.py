"""The explain dict as one self-contained HTML page: inline CSS and JavaScript, no network.

:func:`write_page` fills ``page/explain.html`` with ``page/explain.css``, ``page/explain.js``
and :func:`page_payload`, the dict's numbers as the page needs them (JSON; arrays as base64 of
little-endian typed arrays). The page shows the text (click or hover a held token), step 1 for
the chosen layer and head as bars (q . k, scaled score, softmax weight, hidden keys marked
hidden), step 2 (weight x value, the output, the check against the model's own forward), an
overview grid of every layer x head grouped by shared KV head, and what is on screen.

Numbers travel as float32 (weights within 6e-8 of the dict's float64 values, far inside the
1e-6 the page promises), the log-sum-exp as float64. Up to :data:`ALL_KEYS` tokens a row lists
every key; beyond, the :data:`TOP_KEYS` keys with the most weight, the total of the others, and a
strip of :data:`STRIP_BINS` bins (the largest weight in each) for where the weight goes, so a
long text costs about ``layers x heads x (TOP_KEYS + STRIP_BINS)`` numbers per held row.
"""

from __future__ import annotations

import base64
import json
import math
import re
from importlib import resources
from pathlib import Path

import torch

ALL_KEYS = 256
"""A row lists every key up to this many tokens."""
TOP_KEYS = 64
"""Beyond :data:`ALL_KEYS` tokens, a row lists this many keys: those with the most weight."""
STRIP_BINS = 256
"""Beyond :data:`ALL_KEYS` tokens, a row's weights are also drawn as this many bins."""

_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.int32: "i32", torch.uint8: "u8"}


def _array(tensor: torch.Tensor, dtype: torch.dtype) -> dict:
    array = tensor.detach().to(dtype).contiguous().numpy()
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)  # typed arrays in the page read little-endian
    return {"dtype": _DTYPES[dtype], "shape": list(array.shape), "data": base64.b64encode(little.tobytes()).decode()}


def _listed_keys(weights: torch.Tensor, n: int) -> torch.Tensor | None:
    """``(L, H, R, K)`` key positions a row lists (most weight, ascending), None for all ``n``."""
    if n <= ALL_KEYS:
        return None
    return weights.topk(TOP_KEYS, dim=-1).indices.sort(dim=-1).values


def _strips(weights: torch.Tensor, allowed: torch.Tensor) -> dict:
    """The largest weight of each bin of consecutive keys, and whether its keys are hidden
    (0 none, 1 some, 2 all), ``(L, H, R, bins)``."""
    n = weights.shape[-1]
    width = math.ceil(n / STRIP_BINS)
    bins = math.ceil(n / width)
    pad = bins * width - n
    w = torch.nn.functional.pad(weights, (0, pad)).unflatten(-1, (bins, width))
    seen = torch.nn.functional.pad(allowed, (0, pad)).unflatten(-1, (bins, width)).sum(-1)
    real = torch.full((bins,), width)
    real[-1] = width - pad
    hidden = torch.where(seen == 0, 2, torch.where(seen < real, 1, 0))
    return {"width": width, "max": _array(w.amax(-1), torch.float32), "hidden": _array(hidden, torch.uint8)}


def _step1(data: dict) -> dict:
    s1 = data["step1"]
    weights, allowed = s1["weights"], s1["allowed"]
    n = weights.shape[-1]
    keys = _listed_keys(weights, n)
    qk = s1["qk"].masked_fill(~allowed, math.nan)  # NaN: hidden, never a score
    out = {"lse": _array(s1["lse"], torch.float64),
           "extra": [{"label": e["label"], "scores": _array(e["scores"], torch.float64),
                      "weights": _array(e["weights"], torch.float64)} for e in s1["extra"]]}
    if keys is None:
        return out | {"qk": _array(qk, torch.float32), "weights": _array(weights, torch.float32)}
    listed = weights.gather(-1, keys)
    hidden_listed = (~allowed.gather(-1, keys)).sum(-1)
    return out | {
        "keys": _array(keys, torch.int32),
        "qk": _array(qk.gather(-1, keys), torch.float32),
        "weights": _array(listed, torch.float32),
        "rest": _array(weights.sum(-1) - listed.sum(-1), torch.float64),
        "rest_hidden": _array((~allowed).sum(-1) - hidden_listed, torch.int32),
        "strip": _strips(weights, allowed),
    }


def _step2(data: dict) -> dict:
    """Listed keys, their weights and shares, the output and its check; value vectors once per
    (layer, KV head, key) in one table that ``value_index`` points into."""
    model, s2 = data["model"], data["step2"]
    keys, values = s2["keys"], s2["values"]  # (L, H, R, C), (L, H, R, C, D)
    n_layers, n_heads = keys.shape[:2]
    group, n = n_heads // model["n_kv_heads"], len(data["tokens"]["ids"])
    layer = torch.arange(n_layers)[:, None, None, None]
    kv = (torch.arange(n_heads) // group)[None, :, None, None]
    codes = ((layer * model["n_kv_heads"] + kv) * n + keys).flatten()
    unique, index = torch.unique(codes, return_inverse=True)
    first = torch.full((len(unique),), len(codes)).scatter_reduce(0, index, torch.arange(len(codes)), "amin")
    error = (s2["output"] - s2["actual"]).abs().amax(-1)
    return {
        "keys": _array(keys, torch.int32),
        "weights": _array(data["step1"]["weights"].gather(-1, keys), torch.float32),
        "shares": _array(s2["shares"], torch.float32),
        "output": _array(s2["output"], torch.float32),
        "error": _array(error, torch.float32),
        "value_index": _array(index.view(keys.shape), torch.int32),
        "value_table": _array(values.reshape(-1, values.shape[-1])[first], torch.float32),
    }


def page_payload(data: dict) -> dict:
    """The JSON-able part of the explain dict ``data`` that the page reads."""
    plain = {key: data[key] for key in ("schema", "model", "layers", "notes", "text", "tokens", "prompt_tokens",
                                        "rows", "every_row", "token", "token_note", "layer", "head", "head_note")}
    n = len(data["tokens"]["ids"])
    return plain | {"listed": "all" if n <= ALL_KEYS else TOP_KEYS, "step1": _step1(data), "step2": _step2(data)}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")


def render_page(data: dict) -> str:
    """The page's HTML for the explain dict ``data``."""
    payload = json.dumps(page_payload(data), separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # a token "</script>" must not end the data block
    title = f"attnkit explain · {data['model']['name']} · {data['text'][:60]}"
    parts = {"/*CSS*/": _asset("explain.css"), "/*JS*/": _asset("explain.js"), "__DATA__": payload,
             "__TITLE__": _escape(title)}
    # One pass, so that nothing inserted is searched for markers again.
    return _MARKERS.sub(lambda found: parts[found.group()], _asset("explain.html"))


_MARKERS = re.compile(r"/\*CSS\*/|/\*JS\*/|__DATA__|__TITLE__")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_page(data: dict, path: Path) -> int:
    """Write the page of ``data`` to ``path``; returns its size in bytes."""
    text = render_page(data).encode("utf-8")
    Path(path).write_bytes(text)
    return len(text)
