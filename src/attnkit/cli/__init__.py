"""The ``attnkit`` command line: the parser, ``main()`` and the one-line error convention.

Each subcommand lives in its own module and only registers here. A subcommand module exposes
``register(subparsers)``, which adds its parser and sets ``func=run`` (a callable taking the parsed
namespace and returning an exit code). Modules import their optional dependencies (matplotlib,
transformers, tokenizers) and their heavy machinery inside ``run``, so a missing extra only
affects the command that needs it and ``attnkit --help`` stays fast.

Errors: a bad argument or input ends the program with exit code 2 and one line on stderr
(``attnkit: error: ...``); set ``ATTNKIT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

import attnkit

# Modules whose ``register(subparsers)`` adds a subcommand, in the order ``--help`` lists them.
# explain, generate and chat still live beside the models they drive.
COMMAND_MODULES = [
    "attnkit.analysis.explain_command",
    "attnkit.cli.bench",
    "attnkit.cli.patterns",
    "attnkit.cli.ring",
    "attnkit.cli.arch",
    "attnkit.models.generate_command",
    "attnkit.models.chat_command",
    "attnkit.cli.lab",
    "attnkit.cli.info",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Exact, fast self-attention: explain it, measure it, run it.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # commands that record how they were invoked read it here
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("attnkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for users; the traceback on request
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, (ValueError, TypeError, FileNotFoundError)) else f"{type(exc).__name__}: "
        print(f"attnkit: error: {kind}{message}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
