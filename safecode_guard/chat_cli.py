"""Moved to `safecode_guard.cli.chat`; this path keeps working."""

from .cli.chat import configure_parser, run_command

__all__ = ["configure_parser", "run_command"]
