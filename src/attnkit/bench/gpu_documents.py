"""Issue 21's GPU item: packed documents on the Triton kernels against torch's varlen attention.

``python -m attnkit.bench.gpu_documents --out DIR`` times ``Causal() & Document(lengths)`` over one
row of ``N`` tokens (32,768 by default, documents of 512-4096 tokens as in ``attnkit bench --case
document``), bfloat16, ``H=16, D=128``, forward and forward + backward, contenders interleaved:

- ``attnkit triton``: :func:`attnkit.attention` with ``backend="triton"`` (``(1, H, N, D)``);
- ``attnkit auto``: the same with the default dispatch;
- ``torch varlen``: ``torch.nn.attention.varlen.varlen_attn(q, k, v, cu_seq, cu_seq, max_len,
  max_len, window_size=(-1, 0))`` on ``(N, H, D)`` (torch 2.13's API: causal is ``window_size``);
- ``flash-attn varlen``: ``flash_attn_varlen_func(..., causal=True)`` where ``flash_attn`` imports.

The target: attnkit triton within 1.5x of the varlen kernel. Each row gives the median ms, the
ratio to ``torch varlen`` (or to the first contender that ran) and the largest difference of the
forward output from that baseline's. A contender that cannot run is listed under ``skipped`` with
its reason; ``gpu_documents.json`` under ``--out`` is rewritten after every mode, so a run cut off
keeps what it measured. ``--tiny`` (``N=128``, ``H=2``, ``D=64``, float32) checks the logic on a
CPU (``--device cpu``: varlen and FlashAttention are CUDA-only and skipped; the Triton row needs
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..functional import attention
from ..patterns import Causal, Document
from .documents import document_lengths
from .runner import time_interleaved
from .table import print_section

FULL = dict(n=32768, heads=16, head_dim=128, dtype=torch.bfloat16, shortest=512, longest=4096)
TINY = dict(n=128, heads=2, head_dim=64, dtype=torch.float32, shortest=16, longest=48)
AttentionCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(q, k, v) -> out``, each ``(N, H, D)``: every contender takes and gives this layout."""


def _attnkit(pattern, backend: str) -> AttentionCall:
    def run(q, k, v):  # (N, H, D) -> (1, H, N, D) views and back: no copy of the inputs
        out = attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), pattern, backend=backend)
        return out[0].transpose(0, 1)
    return run


def _torch_varlen(cu_seq: torch.Tensor, longest: int) -> AttentionCall:
    from torch.nn.attention.varlen import varlen_attn

    return lambda q, k, v: varlen_attn(q, k, v, cu_seq, cu_seq, longest, longest, window_size=(-1, 0))


def _flash_varlen(cu_seq: torch.Tensor, longest: int) -> AttentionCall:
    from flash_attn import flash_attn_varlen_func  # an optional peer: present on some GPU images

    return lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_seq, cu_seq, longest, longest, causal=True)


def contenders(lengths: list[int], device: torch.device) -> tuple[dict[str, AttentionCall], dict[str, str]]:
    """``({name: call}, {name: why skipped})`` for documents of ``lengths`` on ``device``."""
    pattern = Causal() & Document(lengths)
    cu_seq = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    found = {"attnkit triton": _attnkit(pattern, "triton"), "attnkit auto": _attnkit(pattern, "auto")}
    skipped = {}
    for name, make in (("torch varlen", _torch_varlen), ("flash-attn varlen", _flash_varlen)):
        if device.type != "cuda":
            skipped[name] = "CUDA only"
            continue
        try:
            found[name] = make(cu_seq, max(lengths))
        except ImportError as exc:
            skipped[name] = f"not importable: {exc}"
    return found, skipped


def _step(call: AttentionCall, q, k, v, backward: bool) -> Callable[[], object]:
    if not backward:
        def forward():
            with torch.no_grad():
                return call(q, k, v)
        return forward
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def forward_backward():
        call(*leaves).backward(grad)
        for leaf in leaves:
            leaf.grad = None
    return forward_backward


def run(out_dir: Path, device: torch.device, shape: dict, repeats: int) -> dict:
    """Time every contender that runs, forward then forward + backward; returns (and writes) the result."""
    lengths = document_lengths(shape["n"], shape["shortest"], shape["longest"])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape["n"], shape["heads"], shape["head_dim"], generator=gen).to(device, shape["dtype"])
               for _ in range(3))
    calls, skipped = contenders(lengths, device)
    result = {"meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                       "torch": torch.__version__, "documents": len(lengths), "repeats": repeats,
                       **{key: str(value) if key == "dtype" else value for key, value in shape.items()}},
              "rows": [], "skipped": dict(skipped)}
    outputs = {}
    for name, call in list(calls.items()):  # one call each: what fails is skipped, with its reason
        try:
            with torch.no_grad():
                outputs[name] = call(q, k, v).float()
        except Exception as exc:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
            result["skipped"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            del calls[name]
    base = "torch varlen" if "torch varlen" in calls else next(iter(calls), None)
    for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        start = time.monotonic()
        names = list(calls)
        try:
            times = time_interleaved([_step(calls[n], q, k, v, backward) for n in names], repeats, device)
        except Exception as exc:  # noqa: BLE001 - the forward rows stay when a backward fails
            result["skipped"][mode] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        timed = dict(zip(names, times))
        for name in names:
            result["rows"].append({
                "contender": name, "mode": mode, "median_ms": timed[name] * 1e3,
                "x_baseline": timed[name] / timed[base], "baseline": base,
                "max_abs_diff_fwd": float((outputs[name] - outputs[base]).abs().max()),
            })
        result["meta"][f"{mode}_seconds"] = round(time.monotonic() - start, 1)
        (out_dir / "gpu_documents.json").write_text(json.dumps(result, indent=1))
    (out_dir / "gpu_documents.json").write_text(json.dumps(result, indent=1))
    return result


def _print(result: dict) -> None:
    meta = result["meta"]
    title = (f"Causal & Document: N={meta['n']} in {meta['documents']} documents, H={meta['heads']}, "
             f"D={meta['head_dim']}, {meta['dtype']}, {meta['device']}")
    rows = [[row["contender"], row["mode"], f"{row['median_ms']:.3f}", f"{row['x_baseline']:.2f}",
             f"{row['max_abs_diff_fwd']:.2e}"] for row in result["rows"]]
    print_section(title, ("contender", "mode", "median ms", "x baseline", "max |diff| fwd"), rows, result["skipped"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnkit.bench.gpu_documents", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_documents.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (check the logic on a CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out, torch.device(args.device), TINY if args.tiny else FULL, args.repeats)
    _print(result)
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
