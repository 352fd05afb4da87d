"""The problem ``attnkit ring`` runs, as the launcher builds it and each worker receives it.

The launcher hands the case to every torchrun worker as JSON in an environment variable
(:data:`CASE_VARIABLE`). The pattern travels as its command-line spelling (``pattern_name``, e.g.
``window:100``): the worker rebuilds it with the same parser the launcher used, which the caller
of :func:`case_from_json` passes in, so this module needs no part of the command line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

from ..patterns import Pattern


@dataclass
class RingCase:
    """The problem ``attnkit ring`` runs (full sequence ``seq``, split over the ranks) and the
    scheme it runs it with (``"ring"``, ``"ulysses"``, ``"hybrid"`` on a grid of
    ``ulysses_degree`` x the rest).

    ``work_dir`` is where each rank writes the phase it is in (:func:`phase_file`), each failing
    rank its one-line error (``rank{r}.txt``), and rank 0 the result (:data:`RESULT_FILE`), for
    the launcher to show and report.
    """

    seq: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    pattern: Pattern
    pattern_name: str
    layout: str
    dtype: str
    check: bool
    timeout: float
    seed: int
    work_dir: str
    scheme: str = "ring"
    ulysses_degree: int = 1
    """Ulysses ranks per group: the world for ``"ulysses"``, 1 for ``"ring"``."""


CASE_VARIABLE = "ATTNKIT_RING_CASE"
"""The environment variable in which the launcher hands each worker :func:`case_to_json`'s text."""

RESULT_FILE = "result.json"
"""Rank 0's ``{"reports": [...], "errors": ...}``, in ``work_dir``."""


def phase_file(work_dir: str, rank: int) -> str:
    """Where rank ``rank`` writes the phase it is in (``"forward"``, ``"backward"``, ...) for the
    launcher's progress display."""
    return os.path.join(work_dir, f"phase{rank}.txt")


def case_to_json(case: RingCase) -> str:
    """Every field but the pattern object, which ``pattern_name`` spells."""
    fields = asdict(case)
    fields.pop("pattern")
    return json.dumps(fields)


def case_from_json(text: str, parse_pattern: Callable[[str], Pattern]) -> RingCase:
    """The case :func:`case_to_json` wrote, its pattern rebuilt by ``parse_pattern(pattern_name)``."""
    fields = json.loads(text)
    return RingCase(pattern=parse_pattern(fields["pattern_name"]), **fields)


__all__ = ["CASE_VARIABLE", "RESULT_FILE", "RingCase", "case_from_json", "case_to_json", "phase_file"]
