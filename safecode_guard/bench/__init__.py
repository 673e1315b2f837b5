"""Benchmarks (`safecode-guard bench` / `bench-serve`): SafeCoDe against plain decoding, side by side.

Modules: `methods` (one request, each decoding method timed in interleaved rounds),
`concurrency` (many requests at once: batched against serialised), `stall` (a running
stream's longest gap while a long prompt arrives), `serve` (load on a running server),
`common` (the preset model, peak memory, reports), `scene` (the prompt and image),
`command` (the `bench` subcommand's flags).
"""

from __future__ import annotations

from .command import configure_parser, run_command
from .methods import METHODS, BenchReport, run_bench

__all__ = ["METHODS", "BenchReport", "configure_parser", "run_bench", "run_command"]
