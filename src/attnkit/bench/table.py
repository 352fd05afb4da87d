"""Benchmark rows as a table: a rich table for a terminal, aligned plain text for anything else."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape
from rich.table import Table

from .runner import BenchRow

COLUMNS = ("case", "N", "contender", "median ms", "GFLOP/s", "ratio", "max |err|", "largest MiB", "peak MiB", "note")
_LEFT = ("case", "contender", "note")


def _cells(r: BenchRow) -> list[str]:
    ratio = "" if r.vs_baseline is None else f"{r.vs_baseline:.2f}x"
    return [r.case, str(r.seq), r.contender, f"{r.median_ms:.2f}", f"{r.gflops:.1f}", ratio, f"{r.max_abs_err:.1e}",
            f"{r.largest_tensor_mib:.1f}", "" if r.peak_mib is None else f"{r.peak_mib:.1f}", r.note]


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
