"""`run_eval`: answer every item twice (plain and SafeCoDe), append results, resume, summarise."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import ResumeMismatchError, SafeCoDeInputError
from ..images import load_image
from .datasets import FORMATS, EvalItem, Format
from .refusal import RefusalCheck, RefusalGrader, check_answer, make_grader
from .scoring import plot_comparison, score_records, summary_table

# --------------------------------------------------------------------------- the runner


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records in a results.jsonl; a torn line (a run killed mid-write) is dropped
    from the file, so that appending goes on cleanly."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    records, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
        else:
            torn += 1
    if torn or (text and not text.endswith("\n")):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    if torn:
        print(f"[eval] dropped {torn} unreadable line(s) from {path}", file=sys.stderr)
    return records


def _latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last record of each id, where a finished record beats an errored one."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        old = out.get(r["id"])
        if old is None or r.get("error") is None or old.get("error") is not None:
            out[r["id"]] = r
    return out


def _messages(image: Any, request: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [] if image is None else [{"type": "image", "image": image}]
    content.append({"type": "text", "text": request})
    return [{"role": "user", "content": content}]


def _judge_answer(
    result: Any,
    item: EvalItem,
    phrases: Sequence[str],
    mode: RefusalCheck,
    count_warnings: bool,
    grader: RefusalGrader | None,
) -> dict[str, Any]:
    check = check_answer(result.text, phrases)
    refused = check.refused(mode, count_warnings=count_warnings)
    graded, grader_error = None, None
    if grader is not None:
        try:
            graded = grader(item.request, result.text, count_warnings=count_warnings)
            refused = graded
        except Exception as exc:  # any grader failure keeps the phrase decision, with the reason
            grader_error = f"{type(exc).__name__}: {exc}"
    out = {
        "text": result.text,
        "refused": refused,
        "opens_with_refusal": check.opens_with_refusal,
        "contains_refusal": check.contains_refusal,
        "warns": check.warns,
        "grader": graded,
        "grader_error": grader_error,
        "finish_reason": result.finish_reason,
        "completion_tokens": result.usage.completion_tokens,
        "seconds": round(result.timings.get("total_s", 0.0), 4),
    }
    if result.verdict is not None:
        out["verdict"] = result.verdict.to_dict()
    return out


def _progress(total: int, enabled: bool) -> Any:
    """tqdm on stderr (installed with transformers), or a no-op with the same calls."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="eval", unit="item", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            pass

    class _Quiet:
        def update(self, n: int = 1) -> None: ...
        def set_postfix(self, **kw: Any) -> None: ...
        def close(self) -> None: ...

    return _Quiet()


@dataclass
class EvalReport:
    """What `run_eval` did and wrote."""

    summary: dict[str, Any]
    table: str
    results_path: Path
    summary_path: Path
    plot_path: Path | None
    ran: int
    """Items answered in this call."""
    skipped: int
    """Items already finished in `<out>/results.jsonl` (resume)."""
    errors: int
    """Items of the selection whose last attempt failed (bad image, prompt too long, ...)."""


def run_fingerprint(engine: Any, fmt: str, max_new_tokens: int, refusal_check: str, grader: RefusalGrader | None) -> dict[str, Any]:
    """The settings that make results comparable; resuming requires the same ones."""
    return {
        "format": fmt,
        "model": str(engine.model_name),
        "judge": str(getattr(engine.judge_impl, "name", engine.judge_impl)),
        "config": engine.config.model_dump(mode="json"),
        "max_new_tokens": max_new_tokens,
        "refusal_check": refusal_check,
        "grader": None if grader is None else grader.name,
    }


def _check_resume(run_path: Path, fingerprint: dict[str, Any]) -> None:
    if not run_path.exists():
        run_path.write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
        return
    try:
        old = json.loads(run_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        old = {"run.json": "unreadable"}
    changed = sorted(k for k in fingerprint.keys() | old.keys() if fingerprint.get(k) != old.get(k))
    if changed:
        diffs = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        raise ResumeMismatchError(
            f"{run_path.parent} holds results made with other settings ({diffs}). "
            "Use a new --out folder, or delete that folder to start over."
        )


def run_eval(
    engine: Any,
    items: Sequence[EvalItem],
    out_dir: str | Path,
    *,
    fmt: Format,
    max_new_tokens: int = 256,
    refusal_check: RefusalCheck = "contains",
    grader: Any = None,
    progress: bool = True,
    plot: bool = True,
    stdout: TextIO | None = None,
) -> EvalReport:
    """Answer every item with `engine.baseline` and `engine.generate`; write results, summary, plot.

    Items already finished in `<out_dir>/results.jsonl` are skipped, so a run
    that stopped resumes; items that failed with an input error (a corrupt
    image, a prompt over the limit) are recorded with `error` and retried on
    the next run. Both answers use greedy decoding with `max_new_tokens`.
    `grader` (a LangChain chat model or a spec, see `make_grader`) replaces
    the phrase decision when it gives a grade. The summary covers the items
    of `items` only; `stdout` (default `sys.stdout`) gets the table.
    """
    if fmt not in FORMATS:
        raise SafeCoDeInputError(f"Unknown format {fmt!r}. Use one of {', '.join(FORMATS)}.")
    if refusal_check not in ("prefix", "contains"):
        raise SafeCoDeInputError(f"`refusal_check` (={refusal_check!r}) must be 'prefix' or 'contains'.")
    grader = make_grader(grader)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path, summary_path = out / "results.jsonl", out / "summary.json"
    fingerprint = run_fingerprint(engine, fmt, max_new_tokens, refusal_check, grader)
    _check_resume(out / "run.json", fingerprint)

    finished = {i for i, r in _latest_by_id(read_records(results_path)).items() if not r.get("error")}
    pending = [item for item in items if item.id not in finished]
    phrases = tuple(engine.config.refusal_phrases)
    count_warnings = fmt == "mssbench"  # MSSBench's rubric counts a named risk like a refusal
    bar = _progress(len(pending), progress)
    n_errors = 0
    try:
        with results_path.open("a", encoding="utf-8") as sink:
            for item in pending:
                record: dict[str, Any] = {
                    "id": item.id,
                    "format": fmt,
                    "expected": item.expected,
                    "request": item.request,
                    "image": None if item.image_path is None else str(item.image_path),
                    "meta": item.meta,
                }
                try:
                    image = None if item.image_path is None else load_image(item.image_path.read_bytes(), engine.policy)
                    messages = _messages(image, item.request)
                    plain = engine.baseline(messages, max_new_tokens=max_new_tokens)
                    steered = engine.generate(messages, max_new_tokens=max_new_tokens)
                    record["baseline"] = _judge_answer(plain, item, phrases, refusal_check, count_warnings, grader)
                    record["safecode"] = _judge_answer(steered, item, phrases, refusal_check, count_warnings, grader)
                    record["error"] = None
                except (SafeCoDeInputError, OSError) as exc:  # this item's fault: note it, go on
                    record["error"] = f"{type(exc).__name__}: {exc}"
                    n_errors += 1
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()  # a killed run keeps every finished item
                bar.update(1)
                if n_errors:
                    bar.set_postfix(errors=n_errors)
    finally:
        bar.close()

    latest = _latest_by_id(read_records(results_path))
    selected = [latest[i.id] for i in items if i.id in latest]
    scored = [r for r in selected if not r.get("error")]
    scores = score_records(fmt, scored)
    errors = [{"id": r["id"], "error": r["error"]} for r in selected if r.get("error")]
    summary = {
        **fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "items": len(items),
        "scored": len(scored),
        "errors": errors,
        "baseline": scores["baseline"],
        "safecode": scores["safecode"],
    }
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    table = summary_table(fmt, scores)
    print(table, file=stdout or sys.stdout)

    plot_path = None
    if plot:
        try:
            title = f"{fmt}: {Path(str(engine.model_name)).name}, {len(scored)} items"
            plot_path = plot_comparison(fmt, scores, out / "comparison.png", title=title)
        except ImportError as exc:
            print(f"[eval] no comparison.png: {exc}", file=sys.stderr)
    return EvalReport(
        summary=summary,
        table=table,
        results_path=results_path,
        summary_path=summary_path,
        plot_path=plot_path,
        ran=len(pending),
        skipped=len(items) - len(pending),
        errors=len(errors),
    )


