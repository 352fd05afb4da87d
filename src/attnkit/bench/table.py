"""Benchmark rows as a table: a rich table for a terminal, aligned plain text for anything else."""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from rich.markup import escape
from rich.table import Table

from .runner import BenchRow

COLUMNS = ("case", "N", "contender", "median ms", "GFLOP/s", "ratio", "max |err|", "largest MiB", "peak MiB", "note")
_LEFT = ("case", "contender", "note")


def _number(value: Optional[float], spec: str, suffix: str = "") -> str:
    """``value`` formatted, or an empty cell where nothing was measured (None, NaN: a skipped row,
    a compiled contender's tensors)."""
    return "" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def _cells(r: BenchRow) -> list[str]:
    return [r.case, str(r.seq), r.contender, _number(r.median_ms, ".2f"), _number(r.gflops, ".1f"),
            _number(r.vs_baseline, ".2f", "x"), _number(r.max_abs_err, ".1e"), _number(r.largest_tensor_mib, ".1f"),
            _number(r.peak_mib, ".1f"), r.note]


def describe_cases(workloads: Iterable) -> str:
    """Each case's pattern with its sizes, once: ``"window: SlidingWindow(size=256)"``."""
    described = {}
    for w in workloads:
        sizes = [f"{name}={getattr(w.pattern, name)}" for name in ("size", "stride", "summary", "block_size")
                 if getattr(w.pattern, name, None) is not None]
        described.setdefault(w.case, f"{w.case}: {type(w.pattern).__name__}({', '.join(sizes)})")
    return "; ".join(described.values())


def rich_table(rows: Sequence[BenchRow], title: str) -> Table:
    """The rows as a rich table, for a terminal."""
    table = Table(title=title)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in _LEFT else "right")
    for r in rows:
        table.add_row(*(escape(cell) for cell in _cells(r)))  # notes hold text like "attnkit[bench]"
    return table


def plain_table(rows: Sequence[BenchRow], title: str) -> str:
    """The rows as aligned plain text, every cell whole, for output that is not a terminal."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if name in _LEFT else c.rjust(w)
                         for name, c, w in zip(COLUMNS, row, widths)).rstrip()

    return "\n".join([title, line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def print_section(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], skipped: dict[str, str]) -> None:
    """A GPU benchmark section's result on the terminal: its ``rows`` of cells under ``columns``
    as a rich table, then each contender it ``skipped`` (name -> why)."""
    from rich.console import Console

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for cells in rows:
        table.add_row(*(escape(cell) for cell in cells))
    console = Console(width=150)
    console.print(table)
    for name, why in skipped.items():
        console.print(escape(f"skipped {name}: {why}"))
