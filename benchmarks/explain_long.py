"""``attnkit explain --html`` at long context: time, peak memory and page size against a plain forward pass.

For each prompt length, two fresh processes run the same model on the same prompt: one plain
forward pass (the model loaded as explain loads it, float32), and one explanation of a few held
rows (:func:`attnkit.analysis.explain_text` with ``--position``) written as the HTML page. Each
reports its peak resident memory (``ru_maxrss``) and the seconds of its work (loading included
for both); the table gives both and their differences, and the page's size. The prompt is a
repeated paragraph cut at exactly N tokens. Also writes JSON.

Run: ``python benchmarks/explain_long.py --model smollm2 --tokens 8192 --tokens 16384``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

PARAGRAPH = (
    "The committee met on a grey morning to decide where the new bridge would go. Some wanted it near "
    "the old mill, where the river is narrow; others argued for the harbour, where the ferries already "
    "carry most of the traffic. After three hours the chair asked each member to write one sentence on "
    "a card, and the cards were read aloud in the order they were handed in. "
)

_CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
import torch
from attnkit.analysis import explain_text
from attnkit.analysis.explain_page import write_page
from attnkit.models.catalog import resolve_model
from attnkit.models.registry import identify
from attnkit.models.tokenizer import Tokenizer
mode, model, text_file, rows, page = sys.argv[1:6]
text = open(text_file).read()
if mode == "plain":
    checkpoint = identify(resolve_model(model))
    ids = Tokenizer(checkpoint.source)(text).ids
    net = checkpoint.load(dtype=torch.float32)
    with torch.no_grad():
        net(torch.tensor([ids]))
    size = 0
else:
    data = explain_text(text, model=model, positions=[int(r) for r in rows.split(",")])
    size = write_page(data, page)
print(json.dumps({"seconds": time.perf_counter() - start, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "page": size}))
"""


def prompt_of(model: str, tokens: int) -> str:
    """A text of exactly ``tokens`` tokens for ``model``'s tokenizer (BOS included when it adds one)."""
    from attnkit.models.catalog import resolve_model
    from attnkit.models.registry import identify
    from attnkit.models.tokenizer import Tokenizer

    tokenizer = Tokenizer(identify(resolve_model(model)).source)
    text = PARAGRAPH * (tokens // 60 + 2)
    encoded = tokenizer(text)
    if len(encoded) < tokens:
        raise ValueError(f"the paragraph gave only {len(encoded)} tokens")
    cut = text[: encoded.offsets[tokens][0]].rstrip()
    while len(tokenizer(cut)) > tokens:  # a word split by the cut may tokenise longer
        cut = cut[: cut.rstrip().rfind(" ")]
    return cut


def run_child(mode: str, model: str, text_file: Path, rows: list[int], page: Path) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, model, str(text_file), ",".join(map(str, rows)),
                           str(page)], env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a model name or checkpoint path (default smollm2)")
    parser.add_argument("--tokens", type=int, action="append", help="prompt lengths (default 8192)")
    parser.add_argument("--json", default="benchmarks/results/explain_long.json")
    args = parser.parse_args()
    from rich.console import Console

    console = Console()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for n in args.tokens or [8192]:
            text_file = Path(scratch) / f"prompt{n}.txt"
            text = prompt_of(args.model, n)
            text_file.write_text(text)
            rows = sorted({n // 2, n - 1})
            measured = {}
            for mode in ("plain", "explain"):
                with console.status(f"{args.model}, {n} tokens: {mode} ..."):
                    measured[mode] = run_child(mode, args.model, text_file, rows, Path(scratch) / "page.html")
            plain, explained = measured["plain"], measured["explain"]
            row = {"tokens": n, "rows": rows, "plain_s": plain["seconds"], "explain_s": explained["seconds"],
                   "plain_peak_mb": plain["peak"] / 2**20, "explain_peak_mb": explained["peak"] / 2**20,
                   "extra_peak_mb": (explained["peak"] - plain["peak"]) / 2**20,
                   "n_by_n_float32_mb": n * n * 4 / 2**20, "page_mb": explained["page"] / 1e6}
            results.append(row)
            _write(args, results)
            console.print(f"N={n}: plain {row['plain_s']:.1f} s, {row['plain_peak_mb']:.0f} MB peak; explain "
                          f"{row['explain_s']:.1f} s, {row['explain_peak_mb']:.0f} MB peak "
                          f"({row['extra_peak_mb']:+.0f} MB; one N x N float32 matrix: {row['n_by_n_float32_mb']:.0f} MB); "
                          f"page {row['page_mb']:.2f} MB")
    console.print(f"JSON: {args.json}")


def _write(args: argparse.Namespace, results: list[dict]) -> None:
    """The JSON so far (after each length, so that an interrupted run keeps what it measured)."""
    record = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "results": results}
    Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
