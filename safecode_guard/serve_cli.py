"""Moved to `safecode_guard.cli.serve`; this path keeps working."""

from .cli.serve import configure_parser, run_command, run_server, settings_from_args

__all__ = ["configure_parser", "run_command", "run_server", "settings_from_args"]
