"""``python -m attnkit``: the same program as the ``attnkit`` console script."""

import sys

from .cli import main

sys.exit(main())
