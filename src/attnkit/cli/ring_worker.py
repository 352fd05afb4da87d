"""The torchrun entry point of ``attnkit ring``: ``python -m attnkit.cli.ring_worker``.

The launcher (:mod:`.ring`) passes the case as JSON in ``ATTNKIT_RING_CASE``; its pattern is
rebuilt here with the command line's own parser, then :func:`~attnkit.distributed.worker.run_worker`
does the rank's work.
"""

from __future__ import annotations

import os
import sys

from ..distributed.ring_case import case_from_json
from ..distributed.worker import run_worker
from .pattern_args import parse_pattern

CASE_VARIABLE = "ATTNKIT_RING_CASE"


def main() -> int:
    return run_worker(case_from_json(os.environ[CASE_VARIABLE], parse_pattern))


if __name__ == "__main__":
    sys.exit(main())
