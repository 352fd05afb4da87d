"""The exact computations that attention plans are made of."""

from .blockwise import blockwise_kernel, plan_tiles
from .common import merge_lse
from .dense import dense_kernel
from .reference import reference_kernel

__all__ = ["blockwise_kernel", "dense_kernel", "merge_lse", "plan_tiles", "reference_kernel"]
