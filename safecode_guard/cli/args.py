"""The SafeCoDe flags every model-running subcommand shares, and the config they describe."""

from __future__ import annotations

import argparse

from ..config import SafeCoDeConfig

__all__ = ["add_safecode_arguments", "config_from_args"]


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
    group.add_argument("--seed", type=int, help="seed of the pixel noise for the contrast view (0); sampling has its own seed")
    group.add_argument("--check-answer", action="store_true", default=None,
                       help="the judge also classifies each finished answer (guard judges); an unsafe one is "
                            "replaced by a refusal when not streamed, flagged when streamed (off)")
    group.add_argument("--close-constrained", action=argparse.BooleanOptionalAction, default=None,
                       help="a constrained answer (JSON, tool calls) that max_tokens would cut ends with its "
                            "grammar's shortest completion instead, flagged closed_early (on)")


def config_from_args(args: argparse.Namespace):
    """The `SafeCoDeConfig` the flags describe (validation errors name the flag's field)."""
    fields = ("alpha", "noise_std", "steered_steps", "unsafe_mode", "lambda_boost", "lambda_supp",
              "plausibility_beta", "threshold", "on_judge_error", "seed", "check_answer", "close_constrained")
    return SafeCoDeConfig(**{f: getattr(args, f) for f in fields if getattr(args, f, None) is not None})
