"""``attnkit patterns``: show an attention pattern, its density and what computing it costs.

``attnkit patterns strided --stride 4 -n 32 --out strided.png`` prints the 32 x 32 mask, its
density, and at ``--at`` tokens (default 8192) the share of the square that a block mask of
``--block`` (128) visits against the share attnkit's sparse plan computes; ``--out`` saves the mask
as a PNG; a note says why the plan computes more than the block mask where it does (causal).
``attnkit patterns seed`` does this for the seed's variants (causal, sliding window,
strided, fixed) and ``--out`` draws them side by side. The pattern is spelled as for every
subcommand (:mod:`.pattern_args`); bare ``window``, ``strided`` and ``fixed`` take their numbers
from ``--window``, ``--stride`` and ``--summary``. Packed documents (``document:3,0,5``,
``causal-document:LENGTHS``) are shown and costed at the length their documents cover.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..analysis.pattern_view import block_costs, render, save_figure
from ..kernels.sparse_plan import UNIT_ROWS, document_piece
from ..patterns import Pattern
from .pattern_args import parse_titled_pattern, pattern_syntax, spelled_numbers

SEED_VARIANTS = ("causal", "window", "strided", "fixed")
"""What ``attnkit patterns seed`` shows: the seed's four variants, side by side."""
# The numbers --window, --stride and --summary supply, each with its default and what it is.
_OPTIONS = {"SIZE": ("window", 8, "the window size"), "STRIDE": ("stride", 4, "the stride"),
            "SUMMARY": ("summary", 1, "the summary count")}
_DEFAULTED = tuple(_OPTIONS)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "patterns",
        help="show a sparse attention pattern, its density and the work to compute it",
        description="Render a pattern in the terminal (and as a PNG), with its density and the share "
        "of the square a block mask visits against what attnkit's sparse plan computes.",
    )
    parser.add_argument("kind", help=f"the pattern ({pattern_syntax(_DEFAULTED)}), "
                        "or 'seed' for causal, window, strided and fixed side by side")
    parser.add_argument("-n", type=int, default=None, help="tokens shown (default 32; documents: their total)")
    # default None: a number given in the kind as well (window:3 --window 9) is refused, not ignored
    parser.add_argument("--window", type=int, help=f"sliding window size (default {_OPTIONS['SIZE'][1]})")
    parser.add_argument("--stride", type=int, help=f"stride l of strided/fixed (default {_OPTIONS['STRIDE'][1]})")
    parser.add_argument("--summary", type=int,
                        help=f"summary positions c of fixed (default {_OPTIONS['SUMMARY'][1]})")
    parser.add_argument("--at", type=int, default=None, metavar="N",
                        help="length for the cost shares (default 8192; documents: their total)")
    parser.add_argument("--block", type=int, default=128, help="block mask block size (default 128)")
    parser.add_argument("--out", type=Path, metavar="PNG", help="save the mask(s) as a PNG")
    parser.set_defaults(func=run)


def _patterns(args: argparse.Namespace) -> list[tuple[str, Pattern]]:
    """``(title, pattern)`` of the kind asked for, or of the seed's four variants."""
    given = {placeholder: getattr(args, option) for placeholder, (option, _, _) in _OPTIONS.items()}
    for placeholder in set(spelled_numbers(args.kind)) & set(_OPTIONS):  # LENGTHS has no option
        option, _, what = _OPTIONS[placeholder]
        if given[placeholder] is not None:
            raise ValueError(f"kind {args.kind} and --{option} {given[placeholder]} both give {what}; give it once")
    defaults = {placeholder: default if given[placeholder] is None else given[placeholder]
                for placeholder, (_, default, _) in _OPTIONS.items()}
    texts = SEED_VARIANTS if args.kind == "seed" else (args.kind,)
    return [parse_titled_pattern(text, option="kind", defaults=defaults, also=("seed",)) for text in texts]


def _lengths(args: argparse.Namespace, named: list[tuple[str, Pattern]]) -> None:
    """Set ``args.n`` and ``args.at`` to their defaults, or for documents to the length they cover
    (a ValueError when -n or --at asks for another)."""
    pieces = [document_piece(pattern) for _, pattern in named]
    if pieces[0] is None:
        args.n = 32 if args.n is None else args.n
        args.at = 8192 if args.at is None else args.at
        return
    total = pieces[0].documents[-1]
    for option, value in (("-n", args.n), ("--at", args.at)):
        if value is not None and value != total:
            raise ValueError(f"kind {args.kind}: the documents cover {total} tokens; give {option} {total} or leave it out")
    if total <= 0:
        raise ValueError(f"kind {args.kind}: the documents cover no token")
    args.n = args.at = total


def _check(args: argparse.Namespace) -> None:
    for name in ("at", "block"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.out is not None and not args.out.parent.exists():
        raise FileNotFoundError(f"directory {args.out.parent} does not exist (for {args.out})")


def run(args: argparse.Namespace) -> int:
    named = _patterns(args)
    _lengths(args, named)
    _check(args)
    console = Console()
    table = Table(title=f"cost at N={args.at}: share of the N x N square computed")
    for column in ("pattern", f"density (n={args.n})", "allowed", f"block mask ({args.block}x{args.block})",
                   "blocks visited", "attnkit sparse plan"):
        table.add_column(column, justify="left" if column == "pattern" else "right")
    above_block_mask = []
    for title, pattern in named:
        console.print(f"[bold]{title}[/bold]  {pattern!r}")
        console.print(render(pattern, args.n), highlight=False)
        costs = block_costs(pattern, args.at, args.block)
        table.add_row(
            title, f"{pattern.density(args.n):.1%}", f"{costs.allowed:.2%}", f"{costs.block_mask:.2%}",
            f"{costs.blocks}/{costs.blocks_total}", f"{costs.sparse_plan:.2%}",
        )
        if costs.sparse_plan > costs.block_mask:
            above_block_mask.append(title)
    console.print(table)
    if above_block_mask:
        console.print(f"The plan computes more than the block mask for {', '.join(above_block_mask)}: it runs "
                      f"query blocks of {UNIT_ROWS} rows in a few calls of equal key width, each as wide as "
                      "its widest block, trading computed entries for fewer, larger calls. "
                      "The auto backend sends Full and Causal to SDPA instead.")
    if args.out is not None:
        save_figure(named, args.n, args.out)
        console.print(f"wrote {args.out}")
    return 0
