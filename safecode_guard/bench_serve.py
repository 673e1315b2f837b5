"""Moved to `safecode_guard.bench.serve`; this path keeps working."""

from .bench.serve import configure_parser, run_command, run_load

__all__ = ["configure_parser", "run_command", "run_load"]
