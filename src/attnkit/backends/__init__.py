"""Attention backends behind one interface: what each accepts, its cost, forward and gradient share.

:mod:`.base` defines :class:`Problem` (one call) and :class:`Backend`; one module per backend
adapts a kernel of :mod:`attnkit.kernels`; :mod:`.registry` lists them; :mod:`.policy` is ``auto``.
"""

from .base import Backend, Problem, check_pattern, make_problem
from .policy import choose_backend, pick
from .registry import BACKENDS, BY_NAME, REGISTRY, backend_named

__all__ = [
    "BACKENDS", "BY_NAME", "Backend", "Problem", "REGISTRY", "backend_named", "check_pattern", "choose_backend",
    "make_problem", "pick",
]
