"""Moved to `safecode_guard.bench.stall`; this path keeps working."""

from .bench.stall import StallReport, StallStats, run_stall_bench

__all__ = ["StallReport", "StallStats", "run_stall_bench"]
