"""The ``attnkit`` command line. Each subcommand lives in its own module and only registers here.

A subcommand module exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` (a callable taking the parsed namespace and returning an exit code). Modules import
their optional dependencies (matplotlib, transformers, tokenizers) inside ``run``, so a missing
extra only affects the command that needs it.

Errors: a bad argument or input ends the program with exit code 2 and one line on stderr
(``attnkit: error: ...``); set ``ATTNKIT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import Optional, Sequence

import torch

import attnkit
from attnkit.kernels.native_build import native_status
from attnkit.kernels.triton_backend import triton_status

# Modules whose ``register(subparsers)`` adds a subcommand, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "attnkit.analysis.explain_command",
    "attnkit.bench.command",
    "attnkit.analysis.patterns_command",
    "attnkit.distributed.command",
    "attnkit.analysis.arch_command",
    "attnkit.models.generate_command",
    "attnkit.models.chat_command",
    "attnkit.lab.command",
]


def _register_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="versions, backends, threads and devices")
    parser.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="attnkit info", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("attnkit", attnkit.__version__)
    table.add_row("torch", torch.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("backends", ", ".join(attnkit.BACKENDS))
    table.add_row("torch threads", str(torch.get_num_threads()))
    table.add_row("cpu capability", torch.backends.cpu.get_cpu_capability())
    for name, status in native_status().items():
        table.add_row(f"native {name}", status)
    table.add_row("GPU kernels (triton)", triton_status())
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        table.add_row("cuda devices", "; ".join(names))
    else:
        table.add_row("cuda devices", "none")
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="Exact, fast self-attention: explain it, measure it, run it.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _register_info(subparsers)
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


if __name__ == "__main__":
    sys.exit(main())
