"""Benchmark workloads, contenders and the runner behind ``attnkit bench``."""

from .cases import CASE_SETS, contenders_for
from .contenders import Contender
from .runner import BenchRow, largest_tensor_bytes, run_benchmark
from .workload import Workload

__all__ = ["CASE_SETS", "BenchRow", "Contender", "Workload", "contenders_for", "largest_tensor_bytes", "run_benchmark"]
