"""The ``attnkit`` command line: the parser, ``main()`` and the one-line error convention.

Each subcommand lives in its own module, named after the command, and only registers here. A
subcommand module exposes ``register(subparsers)``, which adds its parser and sets ``func=run`` (a
callable taking the parsed namespace and returning an exit code). ``main`` imports only the module
of the command it runs (``--help`` and an unknown command import them all); at their top, command
modules import only attnkit and its required dependencies (torch, numpy, rich, safetensors), and
the commands that read a model (``generate``, ``chat``) import torch only once the model's path is
found, so a wrong path is reported at once. The optional extras (matplotlib, transformers,
tokenizers, gguf, jinja2, the bench peers) are imported where they are used, once a command runs,
so a missing extra only affects the command that needs it.

Errors: a bad argument or input ends the program with exit code 2 and one line on stderr
(``attnkit: error: ...``); set ``ATTNKIT_DEBUG=1`` to see the traceback instead. Ctrl-C, at any
moment from start-up on, ends it with exit code 130 and ``attnkit: interrupted`` on a line of its
own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

import attnkit

# Modules whose ``register(subparsers)`` adds a subcommand, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "attnkit.cli.explain",
    "attnkit.cli.bench",
    "attnkit.cli.patterns",
    "attnkit.cli.ring",
    "attnkit.cli.arch",
    "attnkit.cli.generate",
    "attnkit.cli.chat",
    "attnkit.cli.lab",
    "attnkit.cli.info",
]


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``attnkit`` parser with the subcommands of ``commands`` (module names; default: all of
    :data:`COMMAND_MODULES`)."""
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Exact, fast self-attention: explain it, measure it, run it.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES if commands is None else commands:
        importlib.import_module(name).register(subparsers)
    return parser


def _command_module(argv: Sequence[str]) -> Optional[str]:
    """The module of the command that ``argv`` starts with, None when it starts with none (an
    option such as ``--help``, an unknown word, nothing)."""
    return next((name for name in COMMAND_MODULES if argv and name.rsplit(".", 1)[1] == argv[0]), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        # On a terminal the ^C echo sits where the cursor was, often after text on stdout.
        print(("\n" if sys.stderr.isatty() else "") + "attnkit: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    module = _command_module(argv)
    parser = build_parser(None if module is None else [module])
    args = parser.parse_args(argv)
    args.argv = argv  # commands that record how they were invoked read it here
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as exc:  # one line for users; the traceback on request
        if os.environ.get("ATTNKIT_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, (ValueError, TypeError, FileNotFoundError)) else f"{type(exc).__name__}: "
        print(f"attnkit: error: {kind}{message}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
