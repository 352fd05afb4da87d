"""Benchmark workloads, contenders and the runner behind ``attnkit bench``."""

from .cases import CASE_SETS, Contender, Workload, contenders_for
from .runner import BenchRow, largest_tensor_bytes, run_benchmark

__all__ = ["CASE_SETS", "BenchRow", "Contender", "Workload", "contenders_for", "largest_tensor_bytes", "run_benchmark"]
