"""``attnkit arch PRESET|NAME|PATH``: parameters, KV-cache bytes and FLOPs of a Llama configuration (the
KV cache of a Gemma 3's sliding-window / global layer mix against an all-global one), from a preset, a model name of :mod:`attnkit.models.catalog`, a checkpoint directory, a ``config.json`` or a GGUF file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..analysis import gemma_costs
from ..analysis.arch_plot import plot_compute_shares, plot_kv_by_context
from ..analysis.llama_costs import report
from ..models.catalog import MODELS, resolve_model
from ..models.gemma3 import PRESETS as GEMMA3_PRESETS
from ..models.gemma3 import Gemma3Config
from ..models.gemma3.gguf_checkpoint import config_from_gguf as gemma3_config_from_gguf
from ..models.checkpoint import read_json
from ..models.gemma3.hf_checkpoint import MODEL_TYPE as GEMMA3_MODEL_TYPE
from ..models.gemma3.hf_checkpoint import read_config as read_gemma3_config
from ..models.gguf_file import is_gguf
from ..models.llama import PRESETS, LlamaConfig, read_llama_config
from ..models.llama.hf_checkpoint import read_config
from ..models.registry import identify


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "arch",
        help="parameters, KV-cache size and FLOPs of a Llama or Gemma 3 preset or config.json",
        description="Llama: parameters by component, KV-cache bytes (MHA / GQA / MQA side by side), FLOPs "
        "per token for prefill and decode, and the attention vs MLP share of compute as context grows. "
        "Gemma 3: KV-cache bytes of its sliding-window / global layer mix against an all-global model of "
        "the same shape, as context grows.",
    )
    parser.add_argument("model", help="a preset (llama3.1-8b, gemma3-270m, ...), a model name (attnkit info lists them), a "
                        "Hugging Face directory or config.json, or a .gguf file")
    parser.add_argument("--context", type=int, default=8192, help="context length for KV bytes and FLOPs (default 8192)")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the KV-cache total (default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' for stdout, no tables)")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of compute shares (Llama) or KV "
                        "bytes (Gemma 3) against context")
    parser.set_defaults(func=run)


def load_config(model: str) -> LlamaConfig | Gemma3Config:
    """A preset by name, or the config of a model name, a checkpoint directory, a ``config.json``
    or a GGUF file (read without the weights)."""
    if model in PRESETS:
        return LlamaConfig.preset(model)
    if model in GEMMA3_PRESETS:
        return Gemma3Config.preset(model)
    if model not in {m.name for m in MODELS} and not Path(model).exists():
        raise ValueError(f"{model!r} is neither a preset ({', '.join([*PRESETS, *GEMMA3_PRESETS])}), a model name "
                         f"({', '.join(m.name for m in MODELS)}) nor an existing path")
    path = resolve_model(model, option="model")
    if path.is_file() and not is_gguf(path):
        if read_json(path).get("model_type") == GEMMA3_MODEL_TYPE:
            return read_gemma3_config(path)
        return read_config(path)
    checkpoint = identify(path)
    if checkpoint.family.name == "gemma3":
        source = checkpoint.source
        return gemma3_config_from_gguf(source.gguf, path) if source.format == "gguf" else read_gemma3_config(path)
    if checkpoint.family.name != "llama":
        raise ValueError(f"{path} holds a {checkpoint.family.name} model; attnkit arch reads Llama and Gemma 3 "
                         "configurations")
    return read_llama_config(checkpoint.source)


def _size(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:,.1f} {prefix}{unit}" if prefix else f"{n:,.0f} {unit}"
        n /= 1024
    return ""


def _tables(name: str, r: dict):
    params = Table(title=f"{name}: parameters")
    params.add_column("component")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for part, count in r["parameters"].items():
        params.add_row(part, f"{count:,}", f"{100 * count / r['parameters']['total']:.1f}%")
    kv = Table(title=f"KV cache: per token, and for context {r['context']:,} x batch {r['batch']}")
    for col in ("attention", "kv heads", "parameters", "dtype", "per token", "total"):
        kv.add_column(col, justify="left" if col in ("attention", "dtype") else "right")
    for variant, v in r["kv_cache"].items():
        for i, dtype in enumerate(("bf16", "fp16", "fp32")):
            kv.add_row(variant if i == 0 else "", str(v["n_kv_heads"]) if i == 0 else "",
                       f"{v['parameters']:,}" if i == 0 else "", dtype,
                       _size(v["kv_bytes_per_token"][dtype]), _size(v["kv_bytes_total"][dtype]),
                       end_section=i == 2)
    flops = Table(title=f"per token at context {r['context']:,}")
    flops.add_column("quantity")
    flops.add_column("value", justify="right")
    flops.add_row("prefill FLOPs/token (causal average)", f"{r['flops_per_token']['prefill'] / 1e9:,.2f} GFLOP")
    flops.add_row("decode FLOPs/token", f"{r['flops_per_token']['decode'] / 1e9:,.2f} GFLOP")
    for d, b in r["decode_bytes_per_token"].items():
        flops.add_row(f"decode bytes read/token ({d})", _size(b))
    shares = Table(title="share of decode FLOPs per token as context grows")
    for col in ("context", "GFLOP/token", "attention", "MLP", "head"):
        shares.add_column(col, justify="right")
    for row in r["compute_shares"]:
        shares.add_row(f"{row['context']:,}", f"{row['flops'] / 1e9:,.2f}", f"{100 * row['attention']:.1f}%",
                       f"{100 * row['mlp']:.1f}%", f"{100 * row['head']:.1f}%")
    return params, kv, flops, shares


def _gemma_tables(name: str, r: dict):
    layers = r["layers"]
    mix = (f"{layers['window']} window layers ({layers['sliding_window']:,} positions) + "
           f"{layers['global']} global layers")
    kv = Table(title=f"{name} ({r['parameters'] / 1e6:,.0f}M parameters): KV cache, context {r['context']:,} "
               f"x batch {r['batch']}")
    for col in ("dtype", "layer mix", "all global", "all global / mix"):
        kv.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, row in r["kv_cache"].items():
        kv.add_row(dtype, _size(row["mixed"]), _size(row["all_global"]), f"{row['ratio']:.2f}x")
    growth = Table(title=f"KV cache (bf16) as context grows\n{mix} vs all global")
    for col in ("context", "layer mix", "all global", "all global / mix"):
        growth.add_column(col, justify="right")
    for row in r["kv_by_context"]:
        growth.add_row(f"{row['context']:,}", _size(row["mixed"]), _size(row["all_global"]), f"{row['ratio']:.2f}x")
    return kv, growth


def run(args: argparse.Namespace) -> int:
    config = load_config(args.model)
    for path in (Path(args.json) if args.json and args.json != "-" else None, args.plot):
        if path is not None and not path.parent.exists():
            raise FileNotFoundError(f"directory {path.parent} does not exist (for {path})")
    gemma = isinstance(config, Gemma3Config)
    r = (gemma_costs.report if gemma else report)(config, context=args.context, batch=args.batch)
    if args.json == "-":
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        console = Console()
        for table in (_gemma_tables if gemma else _tables)(args.model, r):
            console.print(table)
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2))
            console.print(f"wrote {args.json}")
    if args.plot:
        if gemma:
            plot_kv_by_context(r["kv_by_context"], f"{args.model}: KV cache of its layer mix vs all-global",
                               args.plot)
        else:
            plot_compute_shares(r["compute_shares"], f"{args.model}: where decode compute goes", args.plot)
        if args.json != "-":
            print(f"wrote {args.plot}")
    return 0
