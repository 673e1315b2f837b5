"""`safecode-guard chat`: one request, optionally with images, answered with SafeCoDe and streamed.

    safecode-guard chat --model ./my-vlm --image scene.jpg "How do I get down there quickly?"

The verdict is printed before the answer (it is decided before the first
token); `--baseline` prints the plain answer too, for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..engine.demo_model import ensure_demo_model, stderr_progress
from ..errors import SafeCoDeError
from .args import add_safecode_arguments, config_from_args

__all__ = ["configure_parser", "run_command"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request", help="what to ask")
    parser.add_argument("--model", default=None, help="local folder or hub id (default: the embedded demo model)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image file (repeatable)")
    parser.add_argument("--system", default=None, help="an optional system prompt")
    parser.add_argument("--judge", default="self", help='judge spec: "self", "self:caption", "fixed:safe", "chat:<provider>:<model>", '
                        '"guard:<folder or hub id>" (Llama Guard 3 Vision / 4, ShieldGemma 2; options after "?", '
                        'e.g. "guard:meta-llama/Llama-Guard-4-12B?device=cuda:1") (default: self)')
    parser.add_argument("--baseline", action="store_true", help="also print the plain answer without SafeCoDe")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    add_safecode_arguments(parser)


def _messages(args: argparse.Namespace) -> list[dict]:
    content: list[dict] = []
    for name in args.image:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--image {name}: no such file")
        # the file is named on our own command line, so reading it is the user's explicit choice
        content.append({"type": "image", "image": path.read_bytes()})
    content.append({"type": "text", "text": args.request})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return [*messages, {"role": "user", "content": content}]


def run_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    # heavy (torch / the server stack): loaded when the command runs, so the parser stays fast
    from ..engine.core import SafeCoDe

    try:
        config = config_from_args(args)
        messages = _messages(args)
        model = args.model
        if model is None:

            model = str(ensure_demo_model(progress=stderr_progress()))
        engine = SafeCoDe.from_pretrained(model, config=config, judge=args.judge, device=args.device, dtype=args.dtype)
        settings = dict(
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            stop=args.stop,
        )
        stream = engine.stream(messages, **settings)
        v = stream.verdict
        score = "n/a" if v.unsafe_score is None else f"{v.unsafe_score:.2f}"
        categories = f", categories={','.join(v.categories)}" if v.categories else ""
        print(f"verdict: {v.label} (unsafe_score={score}, judge={v.judge}, source={v.source}{categories})", file=sys.stderr)
        if v.error:
            print(f"judge error: {v.error}", file=sys.stderr)
        print("SafeCoDe: ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        result = stream.result
        assert result is not None
        print(
            f"[{result.finish_reason}; {result.usage.completion_tokens} tokens; refused={result.refused}; "
            f"{result.timings['total_s']:.1f} s]",
            file=sys.stderr,
        )
        if args.baseline:
            plain = engine.baseline(messages, **settings)
            print(f"plain:    {plain.text}")
    except (SafeCoDeError, ValidationError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
