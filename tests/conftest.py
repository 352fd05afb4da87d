"""Shared test settings: hypothesis profiles sized for a 2-core CI machine, Triton's interpreter on CPU."""

import os

import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels can only run in Triton's interpreter, and Triton reads
# TRITON_INTERPRET when a kernel is defined, so it must be set here, before any test module
# imports attnkit's Triton kernels: set in one test module it would depend on collection order.
# A value the user set (TRITON_INTERPRET=0) is kept; tests/test_triton.py then skips.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default",
    max_examples=int(os.environ.get("ATTNKIT_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")
