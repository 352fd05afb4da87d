"""The markdown table of a static sweep (the JSON rows of ``static_check.py``), no compile:

    python benchmarks/gpu/static_table.py ROWS.json [--out TABLE.md]

Writes: a summary (rows per dtype and head dim, the acceptance's verdict), the launcher's
configurations above 99 KiB of shared memory (sm_90 only: sm_86/sm_89 allow 99 KiB per block, and
the launcher avoids them there), then every row: kernel, dtype, D, config (flags that are False
left out), candidate/launch/extra, registers, spill bytes, shared memory, serialised wgmma, the
first case reaching it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from static_check import SCORE_MODS, SMALL_SHARED, problems  # noqa: E402

KIND = {True: "candidate", False: "launch", "extra": "extra"}


def _config(row: dict) -> str:
    return re.sub(r" ?\b[A-Z_]+=False\b", "", row["config"]).strip()


def _serialised(row: dict) -> str:
    codes = sorted({re.search(r"\((C\d{4})\)", w).group(1) for w in row.get("warnings", []) if "serialized" in w})
    return ", ".join(codes) or "-"


def _cases(row: dict) -> str:
    more = len(row["cases"]) - 1
    return row["cases"][0] + (f" (+{more})" if more else "")


def _score_mod(row: dict) -> str:
    """The row's score modification by name (its ``MOD`` constexpr; "none" for kernels without one)."""
    found = re.search(r"\bMOD=(\d)", row["config"])
    return SCORE_MODS[int(found.group(1))] if found else "none"


def _accepted_scope(row: dict) -> bool:
    return row["dtype"] in ("bf16", "fp16") and row["D"] in (64, 128)


def markdown(rows: list[dict]) -> str:
    lines = []
    counts = collections.Counter((row["dtype"], row["D"], _score_mod(row)) for row in rows)
    lines.append("| dtype | D | score mod | rows |\n|---|---|---|---:|")
    lines += [f"| {dtype} | {dim} | {mod} | {n} |" for (dtype, dim, mod), n in sorted(counts.items(), key=str)]
    broken = [(row, problems(row)) for row in rows if row.get("candidate") != "extra" and problems(row)]
    scope = [row for row in rows if _accepted_scope(row) and row.get("candidate") != "extra"]
    lines.append("")
    lines.append(f"Acceptance (bf16/fp16, D = 64 and 128, the launcher's {len(scope)} configurations: no spill, no "
                 f"serialised wgmma; shared memory <= 227 KiB in every row): **{len(broken)} break it**.")
    lines += [f"- {row['kernel']} {row['dtype']} D={row['D']} {_config(row)}: {'; '.join(why)}" for row, why in broken]
    large = [row for row in scope if row.get("shared", 0) > SMALL_SHARED]
    lines.append("")
    lines.append(f"### The launcher's configurations above 99 KiB ({len(large)}: sm_90 only; avoided on sm_86/sm_89)")
    lines.append("")
    lines.append("| kernel | dtype | D | config | shared | cases |\n|---|---|---|---|---:|---|")
    lines += [f"| {row['kernel']} | {row['dtype']} | {row['D']} | {_config(row)} | {row['shared'] / 1024:.0f} KiB | "
              f"{_cases(row)} |" for row in large]
    lines.append("")
    lines.append(f"### Every row ({len(rows)})")
    lines.append("")
    lines.append("| kernel | dtype | D | config | kind | regs | spill bytes | shared | serialised wgmma | cases |")
    lines.append("|---|---|---|---|---|---:|---:|---|---|---|")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['kernel']} | {row['dtype']} | {row['D']} | {_config(row)} | "
                         f"{KIND[row['candidate']]} | | | | | **does not compile** |")
            continue
        spill = f"{row['spills']}" + (" **x**" if row["spills"] else "")
        shared = f"{row['shared'] / 1024:.0f} KiB" + (" >99K" if row["shared"] > SMALL_SHARED else "")
        lines.append(f"| {row['kernel']} | {row['dtype']} | {row['D']} | {_config(row)} | {KIND[row['candidate']]} | "
                     f"{row['registers']} | {spill} | {shared} | {_serialised(row)} | {_cases(row)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=Path, help="static_check.py --json output")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    text = markdown(json.loads(args.rows.read_text()))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
