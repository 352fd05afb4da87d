"""``python -m attnkit.cli``: the same program as the ``attnkit`` console script."""

import sys

from . import main

sys.exit(main())
