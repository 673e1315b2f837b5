"""`safecode-guard bench`: its flags, and which benchmark each runs (side by side, concurrency, stall)."""

from __future__ import annotations

import argparse
import sys

import torch

from .common import print_report
from .concurrency import MIX_ANSWER_TOKENS, run_concurrency_bench
from .methods import run_bench
from .stall import run_stall_bench

__all__ = ["configure_parser", "run_command"]

def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("tiny", "cpu", "gpu"), default="cpu", help="model shape (default: cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (default: 5)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per call (default: 128)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda for gpu, else cpu)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--concurrency",
        default=None,
        metavar="N,N,...",
        help="instead: many requests at once, e.g. 1,4,8,16 (batched SafeCoDe vs serialised vs plain static batch)",
    )
    parser.add_argument(
        "--mix",
        action="store_true",
        help="with --concurrency: mixed traffic (prompt and answer lengths, some requests without images, self judge)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=512,
        metavar="N",
        help="BatchingConfig.prefill_chunk_tokens for --concurrency and --stall's chunked setting (default: 512)",
    )
    parser.add_argument(
        "--stall",
        type=int,
        default=None,
        metavar="TOKENS",
        help="instead: the longest inter-token gap of a running stream while a prompt of TOKENS tokens "
        "arrives, with chunked prefill off and on",
    )


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(n < 1 or n > 256 for n in levels):
        raise ValueError(text)
    return sorted(set(levels))


def run_command(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.new_tokens < 1:
        print("error: --rounds and --new-tokens must be at least 1", file=sys.stderr)
        return 2
    if (args.preset == "gpu" or (args.device or "").startswith("cuda")) and not torch.cuda.is_available():
        print("error: the gpu preset needs a CUDA device; use --preset cpu here", file=sys.stderr)
        return 2
    if args.mix and args.concurrency is None:
        print("error: --mix goes with --concurrency, e.g. --concurrency 1,4,8 --mix", file=sys.stderr)
        return 2
    if args.prefill_chunk_tokens < 16:
        print("error: --prefill-chunk-tokens must be at least 16", file=sys.stderr)
        return 2
    if args.stall is not None:
        return _run_stall(args)
    if args.concurrency is not None:
        return _run_concurrency(args)
    report = run_bench(
        args.preset,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        device=args.device,
        progress=_progress,
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; "
        f"prompt {report.prompt_tokens} tokens, {report.new_tokens} new tokens, greedy; "
        f"median of {report.rounds} interleaved rounds",
        report,
        args.json_path,
    )


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run_concurrency(args: argparse.Namespace) -> int:

    try:
        levels = _levels(args.concurrency)
    except ValueError:
        print(f"error: --concurrency takes levels from 1 to 256 like 1,4,8,16, not {args.concurrency!r}", file=sys.stderr)
        return 2
    report = run_concurrency_bench(
        args.preset,
        levels=levels,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        device=args.device,
        progress=_progress,
        mix=args.mix,
        chunk_tokens=args.prefill_chunk_tokens,
    )
    workload = (
        f"mixed traffic: prompts {report.prompt_tokens}-{report.prompt_tokens_max} tokens, some without an image, "
        f"{_answer_lengths(report.new_tokens)} new tokens, greedy, self judge"
        if report.mix
        else f"prompt {report.prompt_tokens} tokens, {report.new_tokens} new tokens each, greedy, fixed verdict"
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; {workload}; "
        f"tokens/s from the median of {report.rounds} interleaved rounds, latencies pooled over rounds",
        report,
        args.json_path,
    )


def _answer_lengths(new_tokens: int) -> str:

    lengths = [max(1, round(t * new_tokens / 128)) for t in MIX_ANSWER_TOKENS]
    return f"{min(lengths)}-{max(lengths)}"


def _run_stall(args: argparse.Namespace) -> int:

    if args.stall < 16:
        print("error: --stall takes a prompt length in tokens, e.g. --stall 4096", file=sys.stderr)
        return 2
    report = run_stall_bench(
        args.preset, prompt_tokens=args.stall, rounds=args.rounds, chunk_tokens=args.prefill_chunk_tokens,
        device=args.device, progress=_progress,
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; a stream decodes "
        f"while a {report.prompt_tokens}-token prompt with an image arrives (two rows: real and noised view); "
        f"medians of {report.rounds} interleaved rounds",
        report,
        args.json_path,
    )
