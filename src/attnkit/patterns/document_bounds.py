"""Document bounds (``cu_seqlens``): their check, and which positions share a document.

Kept apart from :mod:`.documents` so that :class:`~attnkit.patterns.Piece` (in :mod:`.base`) and
:class:`~attnkit.patterns.Document` read the same two functions.
"""

from __future__ import annotations

import functools
import operator

import torch


def check_bounds(owner: str, name: str, bounds: object) -> tuple[int, ...]:
    """``bounds`` as a tuple of ints when it is a non-empty sequence (or 1-D integer tensor) of
    non-decreasing integers starting at 0 (``cu_seqlens``), else TypeError / ValueError naming
    ``owner`` and ``name``."""
    if isinstance(bounds, torch.Tensor):
        if bounds.dim() != 1 or bounds.dtype.is_floating_point or bounds.dtype.is_complex or bounds.dtype == torch.bool:
            raise TypeError(f"{owner}: {name} must be a 1-D integer tensor or a list of ints, "
                            f"got a {bounds.dim()}-D {bounds.dtype} tensor")
        bounds = bounds.tolist()
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__iter__"):
        raise TypeError(f"{owner}: {name} must be a list of ints, got {type(bounds).__name__} {bounds!r}")
    values = []
    for value in bounds:
        try:
            if isinstance(value, bool):
                raise TypeError
            values.append(operator.index(value))
        except TypeError:
            raise TypeError(f"{owner}: {name} must hold ints, got {type(value).__name__} {value!r}") from None
    if not values or values[0] != 0:
        raise ValueError(f"{owner}: {name} must start at 0, got {_head(values)}")
    for d in range(1, len(values)):
        if values[d] < values[d - 1]:
            raise ValueError(f"{owner}: {name} must not decrease, got {values[d - 1]} then {values[d]} at index {d}")
    return tuple(values)


def _head(values: list) -> str:
    return repr(values) if len(values) <= 8 else repr(values[:8])[:-1] + ", ...]"


@functools.lru_cache(maxsize=8)
def _ends(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(bounds[1:], dtype=torch.long, device=device)


def document_ids(bounds: tuple[int, ...], positions: torch.Tensor, outside: int) -> torch.Tensor:
    """The document of each position (``d`` with ``bounds[d] <= p < bounds[d + 1]``; empty
    documents hold none), ``outside`` for positions outside ``[0, bounds[-1])``."""
    ends = _ends(bounds, positions.device)
    ids = torch.searchsorted(ends, positions.contiguous(), right=True)
    inside = (positions >= 0) & (positions < bounds[-1])
    return torch.where(inside, ids, outside)


def same_document(bounds: tuple[int, ...], i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """BoolTensor (broadcast of ``i`` and ``j``): do positions ``i`` and ``j`` lie in one document?
    The ids are taken of each index tensor apart, so the only broadcast result is the boolean one."""
    return document_ids(bounds, i, -1) == document_ids(bounds, j, -2)
