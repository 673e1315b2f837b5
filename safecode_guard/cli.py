"""The `safecode-guard` command line: one subcommand per module.

Each subcommand's module provides `configure_parser(parser)` and
`run_command(args) -> int`; modules load only when their command runs.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

__all__ = ["main"]

COMMANDS = {
    "demo": ("safecode_guard.demo", "show SafeCoDe on built-in scenes (embedded demo model by default)"),
    "chat": ("safecode_guard.chat_cli", "one-shot chat with an image, streamed, with the verdict"),
    "eval": ("safecode_guard.evaluation", "compare SafeCoDe with plain decoding on MSSBench, MOSSBench or your own JSONL data"),
    "bench": ("safecode_guard.bench", "time SafeCoDe against plain generate, side by side"),
    "serve": ("safecode_guard.serve_cli", "an OpenAI-compatible HTTP server that returns the verdict with every answer"),
    "bench-serve": ("safecode_guard.bench_serve", "latency, time to first token and tokens/s of a running server"),
}


def add_safecode_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for every `SafeCoDeConfig` setting; unset flags keep the paper's defaults."""
    group = parser.add_argument_group("SafeCoDe settings (defaults: the paper's)")
    group.add_argument("--alpha", type=float, help="contrast weight (0.3)")
    group.add_argument("--noise-std", type=float, help="pixel noise std on the 0..1 scale (0.1)")
    group.add_argument("--steered-steps", type=int, help="tokens steered at the start (5)")
    group.add_argument("--unsafe-mode", choices=("prefix", "boost"), help="on unsafe: open with a refusal, or boost (prefix)")
    group.add_argument("--lambda-boost", type=float, help="refusal boost when unsafe (1.0)")
    group.add_argument("--lambda-supp", type=float, help="refusal suppression when safe (1.0)")
    group.add_argument("--plausibility-beta", type=float, help="plausibility cut (off)")
    group.add_argument("--threshold", type=float, help="unsafe when score >= threshold (0.5)")
    group.add_argument("--on-judge-error", choices=("unsafe", "safe", "raise"), help="judge failure policy (unsafe)")
    group.add_argument("--seed", type=int, help="noise and sampling seed (0)")
    group.add_argument("--check-answer", action="store_true", default=None,
                       help="the judge also classifies each finished answer (guard judges); an unsafe one is "
                            "replaced by a refusal when not streamed, flagged when streamed (off)")


def config_from_args(args: argparse.Namespace):
    """The `SafeCoDeConfig` the flags describe (validation errors name the flag's field)."""
    from .config import SafeCoDeConfig

    fields = ("alpha", "noise_std", "steered_steps", "unsafe_mode", "lambda_boost", "lambda_supp",
              "plausibility_beta", "threshold", "on_judge_error", "seed", "check_answer")
    return SafeCoDeConfig(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})


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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return int(module.run_command(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
