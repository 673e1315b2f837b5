"""The `safecode-guard` command line: one subcommand per module.

Each subcommand's module provides `configure_parser(parser)` and
`run_command(args) -> int`; modules load only when their command runs.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "demo": ("safecode_guard.cli.demo", "show SafeCoDe on built-in scenes (embedded demo model by default)"),
    "chat": ("safecode_guard.cli.chat", "one-shot chat with an image, streamed, with the verdict"),
    "eval": ("safecode_guard.evaluation", "compare SafeCoDe with plain decoding on MSSBench, MOSSBench or your own JSONL data"),
    "bench": ("safecode_guard.bench", "time SafeCoDe against plain generate, side by side"),
    "serve": ("safecode_guard.cli.serve", "an OpenAI-compatible HTTP server that returns the verdict with every answer"),
    "bench-serve": ("safecode_guard.bench.serve", "latency, time to first token and tokens/s of a running server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="safecode-guard",
        description="Safety-aware contrastive decoding (SafeCoDe) for local vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        import_module(module).configure_parser(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = import_module(COMMANDS[args.command][0])
    # Our commands print their own progress lines; transformers' per-load bars would interleave.
    # (imported here, not at the top: `--help` and argument errors stay fast)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return int(module.run_command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
