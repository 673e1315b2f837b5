"""`safecode-guard eval`: SafeCoDe against plain decoding on safety benchmarks.

Input flow: a data folder (or file) in one of three layouts -> `load_mssbench`,
`load_mossbench` or `load_jsonl` -> a list of `EvalItem(id, image_path,
request, expected, meta)`. The loaders only read JSON and check that every
image file exists; a layout that does not match raises `DatasetLayoutError`
naming the missing file or field and the layout expected.

Run (`run_eval`): for each item whose id is not yet in `<out>/results.jsonl`,
the same prompt is answered twice with the same generation settings,
`engine.baseline(...)` (plain decoding) and `engine.generate(...)` (SafeCoDe);
each answer goes through `check_answer` (refusal phrases, safety warnings)
and, optionally, a LangChain chat model that grades it (`RefusalGrader`);
one JSON line per item is appended as soon as it is done, so a stopped run
resumes where it left off.

Output: `score_mssbench` / `score_mossbench` / `score_jsonl` turn the records
into metrics (pure functions), written to `<out>/summary.json`, printed as a
table and drawn in `<out>/comparison.png`.

Metrics (fractions in 0..1; the table shows percentages):

- MSSBench (Zhou et al., "Multimodal Situational Safety", arXiv 2410.06172):
  every query is asked once with its safe image and once with its unsafe
  image. Safe-context accuracy = share of safe-image answers that neither
  refuse nor flag a risk; unsafe-context accuracy = share of unsafe-image
  answers that refuse or flag the risk; total = their mean. Per split.
- MOSSBench (Li et al., arXiv 2406.17806): every query is benign; refusal
  rate overall and per oversensitivity type (lower is better).
- JSONL: refusal as a detector of unsafe requests: precision, recall, F1,
  accuracy over items labelled safe/unsafe, and the overall refusal rate.
"""

from __future__ import annotations

import argparse
import sys

from ..cli.args import add_safecode_arguments, config_from_args
from ..errors import SafeCoDeInputError
from .datasets import (
    FORMATS,
    MOSSBENCH_TYPES,
    DatasetLayoutError,
    EvalItem,
    load_items,
    load_jsonl,
    load_mossbench,
    load_mssbench,
    mossbench_type,
)
from .refusal import (
    REFUSAL_MARKERS,
    SAFETY_WARNING_MARKERS,
    AnswerCheck,
    GraderError,
    RefusalGrader,
    check_answer,
    contains_refusal,
    make_grader,
    parse_grade,
    warns_of_risk,
)
from .runner import EvalReport, ResumeMismatchError, read_records, run_eval, run_fingerprint
from .scoring import (
    headline_metrics,
    plot_comparison,
    score_jsonl,
    score_mossbench,
    score_mssbench,
    score_records,
    summary_table,
)

__all__ = [
    "FORMATS",
    "MOSSBENCH_TYPES",
    "REFUSAL_MARKERS",
    "SAFETY_WARNING_MARKERS",
    "AnswerCheck",
    "DatasetLayoutError",
    "EvalItem",
    "EvalReport",
    "GraderError",
    "RefusalGrader",
    "ResumeMismatchError",
    "check_answer",
    "configure_parser",
    "contains_refusal",
    "headline_metrics",
    "load_items",
    "load_jsonl",
    "load_mossbench",
    "load_mssbench",
    "make_grader",
    "mossbench_type",
    "parse_grade",
    "plot_comparison",
    "read_records",
    "run_command",
    "run_eval",
    "run_fingerprint",
    "score_jsonl",
    "score_mossbench",
    "score_mssbench",
    "score_records",
    "summary_table",
    "warns_of_risk",
]


# --------------------------------------------------------------------------- the command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local folder or hub id of an image-text-to-text model")
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of --data")
    parser.add_argument(
        "--data",
        required=True,
        help="mssbench: folder with combined.json, chat/, embodied/; mossbench: folder with "
        "images_information/ and images/; jsonl: the .jsonl file",
    )
    parser.add_argument("--split", choices=("chat", "embodied", "all"), default=None, help="MSSBench split (default: all)")
    parser.add_argument("--out", required=True, help="results folder; rerun with the same folder to resume")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    parser.add_argument("--judge", default="self", help="judge spec: self, self:caption, fixed:safe, fixed:unsafe, chat:<provider>:<model>, guard:<folder or hub id> (default: self)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (default: 256)")
    add_safecode_arguments(parser)
    parser.add_argument(
        "--refusal-check",
        choices=("contains", "prefix"),
        default="contains",
        help="phrase check: refusal phrases anywhere (and, for mssbench, risk warnings), or only as the opener (default: contains)",
    )
    parser.add_argument("--grader", default=None, help="chat:<provider>:<model>: a LangChain chat model grades each answer")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: where transformers loads it)")
    parser.add_argument("--dtype", default=None, help="torch dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plot", action="store_true", help="skip comparison.png")


def run_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    # torch loads when the command runs: the CLI's parser stays fast
    from ..engine.core import SafeCoDe

    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        # data and settings first: a wrong folder should not wait for a model to load
        items = load_items(args.format, args.data, args.split)
        if not items:
            print(f"error: {args.data} holds no items", file=sys.stderr)
            return 2
        items = items[: args.limit] if args.limit else items
        config = config_from_args(args)
        grader = make_grader(args.grader)
        engine = SafeCoDe.from_pretrained(args.model, judge=args.judge, config=config, device=args.device, dtype=args.dtype)
        print(f"[eval] {len(items)} {args.format} items -> {args.out}", file=sys.stderr)
        report = run_eval(
            engine,
            items,
            args.out,
            fmt=args.format,
            max_new_tokens=args.max_new_tokens,
            refusal_check=args.refusal_check,
            grader=grader,
            progress=not args.no_progress,
            plot=not args.no_plot,
        )
    except (SafeCoDeInputError, ValidationError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[eval] ran {report.ran}, resumed past {report.skipped}, errors {report.errors}", file=sys.stderr)
    print(f"[eval] wrote {report.results_path}, {report.summary_path}" + (f", {report.plot_path}" if report.plot_path else ""), file=sys.stderr)
    return 0
