"""``attnkit info``: versions, backends, native and GPU kernel status, threads, devices, and the models
``--model NAME`` finds (:mod:`attnkit.models.catalog`), with where each is installed."""

from __future__ import annotations

import argparse
import platform

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit.backends import REGISTRY
from attnkit.kernels.native_build import native_status
from attnkit.kernels.triton_launch import triton_status
from attnkit.models.catalog import installed_models


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="versions, backends, threads, devices and installed models")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    table = Table(title="attnkit info", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")  # paths whole, folded rather than cut
    table.add_row("attnkit", attnkit.__version__)
    table.add_row("torch", torch.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("backends", "\n".join(f"{backend.name}: {backend.description}" for backend in REGISTRY))
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
    table.add_row("models (--model NAME)", "\n".join(
        f"{model.name}: {model.what}\n  " + (str(path) if path is not None else f"not installed: {model.install}")
        for model, path in installed_models()))
    Console().print(table)
    return 0
