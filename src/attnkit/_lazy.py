"""Public names imported on first use: a package's ``__getattr__`` and ``__dir__`` (PEP 562).

``import attnkit`` and ``import attnkit.models`` stay quick this way (torch is imported by the
first name that needs it), so the ``attnkit`` command checks its arguments and model paths before
torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the
    submodule (relative to ``package``) that defines it; any subpackage or submodule is reachable
    as an attribute too, as if the package had imported it. A name read once is kept in the
    package's namespace, so it is looked up only the first time."""

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
