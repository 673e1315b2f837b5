"""Moved to `safecode_guard.bench.concurrency`; this path keeps working."""

from .bench.concurrency import ConcurrencyReport, LevelStats, run_concurrency_bench

__all__ = ["ConcurrencyReport", "LevelStats", "run_concurrency_bench"]
