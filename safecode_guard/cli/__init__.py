"""The `safecode-guard` command line: `main` (one subcommand per module), the shared SafeCoDe flags,
and the `demo`, `chat` and `serve` subcommands (`bench` and `bench-serve` live in `safecode_guard.bench`)."""

from __future__ import annotations

from .args import add_safecode_arguments, config_from_args
from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "add_safecode_arguments", "build_parser", "config_from_args", "main"]
