"""Bytes each rank sends for one attention layer under ring, Ulysses and the hybrid, on a Llama shape.

The numbers come from the cost model of :mod:`attnkit.distributed.costs` (the formulas of
``docs/parallel.md``, which the tests check against bytes counted around every
``torch.distributed`` call). ``python -m attnkit.analysis.parallel_costs docs/parallel_costs.png``
prints the table of the docs and draws its plot: Llama 3.1 8B at 128k tokens on 8 and 64 ranks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..distributed.costs import CallShape, ring_steps, scheme_bytes
from ..models.llama import LlamaConfig
from ..models.llama.config import PRESETS
from ..patterns import Causal, Pattern
from .plots import _pyplot


@dataclass(frozen=True)
class SchemeCost:
    """One way to run ``world`` ranks: ``label`` (``"ring"``, ``"ulysses 8"``, ``"hybrid 4x16"``),
    the bytes the busiest rank sends per layer call (forward + backward) and the ring steps it
    runs (0 for Ulysses)."""

    label: str
    ulysses_degree: int
    bytes_per_rank: int
    ring_steps: int


def layer_shape(config: LlamaConfig, seq: int, dtype_bytes: int = 2, batch: int = 1) -> CallShape:
    """The attention call of one layer of ``config`` over ``seq`` tokens."""
    return CallShape(batch, seq, config.n_heads, config.n_kv_heads, config.head_dim, config.head_dim, dtype_bytes)


def scheme_costs(shape: CallShape, world: int, pattern: Pattern = Causal(), layout: str = "zigzag") -> list[SchemeCost]:
    """Ring, Ulysses (when ``world <= Hq``) and every hybrid ``U x R`` with ``1 < U < world``,
    ``U <= Hq``, ``U`` dividing ``world``, for ``pattern`` over the ``layout`` shards."""
    degrees = [d for d in range(1, min(world, shape.q_heads) + 1) if world % d == 0]
    costs = []
    for degree in degrees:
        scheme = "ring" if degree == 1 else "ulysses" if degree == world else "hybrid"
        label = {"ring": "ring", "ulysses": f"ulysses {degree}", "hybrid": f"hybrid {degree}x{world // degree}"}[scheme]
        steps = ring_steps(pattern, layout, shape.seq, world, degree)
        sent = max(
            scheme_bytes(scheme, shape, world, ulysses_degree=degree, rank=rank, ring_steps=steps or None)
            for rank in range(world)
        )
        costs.append(SchemeCost(label, degree, sent, steps))
    return costs


def why_not_ulysses(shape: CallShape, world: int) -> Optional[str]:
    """Why pure Ulysses cannot run ``world`` ranks, or None when it can."""
    if world <= shape.q_heads:
        return None
    return f"{world} ranks > {shape.q_heads} query heads"


def markdown_table(shape: CallShape, worlds: Sequence[int], n_layers: int) -> str:
    """The docs' table: MiB per rank per layer call and GiB per rank for the model's layers."""
    lines = ["| ranks | scheme | ring steps | MiB sent per rank, one layer | GiB per rank, all layers |",
             "|---|---|---|---|---|"]
    for world in worlds:
        for cost in scheme_costs(shape, world):
            lines.append(f"| {world} | {cost.label} | {cost.ring_steps} | {cost.bytes_per_rank / 2**20:,.0f} | "
                         f"{cost.bytes_per_rank * n_layers / 2**30:,.1f} |")
        reason = why_not_ulysses(shape, world)
        if reason:
            lines.append(f"| {world} | ulysses {world} | - | cannot run: {reason} | - |")
    return "\n".join(lines)


def plot_scheme_costs(shape: CallShape, worlds: Sequence[int], title: str, path: Path) -> None:
    """One panel per world size: MiB the busiest rank sends per layer call, one bar per scheme."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 4.2), squeeze=False)
    colours = {"ring": "tab:red", "ulysses": "tab:blue", "hybrid": "tab:green"}
    for ax, world in zip(axes[0], worlds):
        costs = scheme_costs(shape, world)
        mib = [c.bytes_per_rank / 2**20 for c in costs]
        ax.barh(range(len(costs)), mib, color=[colours[c.label.split()[0]] for c in costs])
        ax.set_yticks(range(len(costs)), [c.label for c in costs])
        ax.invert_yaxis()
        for y, value in enumerate(mib):
            ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
        ax.set_xlim(0, max(mib) * 1.25)
        ax.set_xlabel("MiB sent per rank, one layer, forward + backward")
        ax.set_title(f"{world} ranks ({shape.seq // world:,} tokens each)")
        reason = why_not_ulysses(shape, world)
        if reason:
            ax.text(0.98, 0.02, f"no pure Ulysses: {reason}\n(each rank needs a whole query head)",
                    transform=ax.transAxes, ha="right", va="bottom", fontsize=8, style="italic")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Cost plot of ring, Ulysses and hybrid for a Llama preset.")
    parser.add_argument("png", type=Path, help="where to write the plot")
    parser.add_argument("--preset", default="llama3.1-8b", choices=sorted(PRESETS), help="model shape")
    parser.add_argument("--seq", type=int, default=131072, help="tokens in the sequence")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="world sizes, one panel each")
    args = parser.parse_args(argv)
    config = PRESETS[args.preset]
    shape = layer_shape(config, args.seq)
    print(markdown_table(shape, args.ranks, config.n_layers))
    title = (f"{args.preset}: Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.head_dim}, bf16, causal, "
             f"N={args.seq:,} zigzag; cost model of docs/parallel.md")
    plot_scheme_costs(shape, args.ranks, title, args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
