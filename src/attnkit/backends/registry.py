"""The backends, in order. Adding a backend is one module under ``backends/`` and one line here.

The order is how they are listed (``attnkit.BACKENDS``, ``attnkit info``) and which of two
equally cheap backends ``auto`` takes: the earlier one.
"""

from __future__ import annotations

from .base import Backend
from .blockwise import BlockwiseBackend
from .dense import DenseBackend
from .reference import ReferenceBackend
from .sparse import SparseBackend
from .triton import TritonBackend

REGISTRY: tuple[Backend, ...] = (
    ReferenceBackend(),
    DenseBackend(),
    BlockwiseBackend(),
    SparseBackend(),
    TritonBackend(),
)
BY_NAME: dict[str, Backend] = {backend.name: backend for backend in REGISTRY}

BACKENDS: tuple[str, ...] = ("auto", *BY_NAME)
"""Accepted values of ``backend``: ``"auto"`` and every registered backend. Every backend runs
every pattern and is differentiable."""


def backend_named(name: object) -> Backend:
    """The registered backend called ``name``; ValueError naming the accepted values otherwise."""
    backend = BY_NAME.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    return backend
