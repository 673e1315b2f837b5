"""Moved to `safecode_guard.cli.demo`; this path keeps working."""

from .cli.demo import SCENES, Scene, configure_parser, run_command, run_demo

__all__ = ["SCENES", "Scene", "configure_parser", "run_command", "run_demo"]
