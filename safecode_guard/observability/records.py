"""One engine request's trace and audit line: started before its judge, finished when its stream ends.

`RequestRecord.start` returns None when nobody listens (no recording tracer,
no audit log, no scope observer): the engine then does nothing more for
observability. Otherwise the record holds the request span (current while
the request is prepared, so the judge's span is its child) and, when the
stream ends, adds the queue / prefill / window / decode stages as child spans
from the request's own timeline (the scheduler keeps timestamps, never spans),
sets the outcome's attributes, writes the audit line and calls the observers.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import tracing
from .audit import AuditLog, RequestScope, content_sha256, content_text, current_scope

if TYPE_CHECKING:
    from ..engine.jobs import DecodeJob
    from ..engine.results import SafeCoDeResult
    from ..verdict import Verdict

__all__ = ["HeldFailures", "RequestRecord", "held_failures", "observed_check"]


class HeldFailures:
    """Requests that failed while being prepared inside `held_failures()`, not recorded yet."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def superseded(self) -> None:
        """They are asked again: each span ends marked superseded, no audit line."""
        for record in self.records:
            record.discard()
        self.records.clear()

    def failed(self, error: BaseException) -> None:
        """The request ends with `error`: recorded (span and audit line) as its failure."""
        for record in self.records:
            record.finish(None, error=error)
        self.records.clear()


_HELD: contextvars.ContextVar[HeldFailures | None] = contextvars.ContextVar("safecode_held_failures", default=None)


@contextlib.contextmanager
def held_failures() -> Iterator[HeldFailures]:
    """Within it, a request that fails while it is prepared (e.g. its judge is busy) is not recorded
    at once: a caller that retries calls `superseded()` (one audit line per request, not per
    attempt), one that gives up `failed(error)`. Whatever is still held at the end is recorded
    with its own error."""
    held = HeldFailures()
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)
        for record in held.records:
            record.finish(None, error=record.held_error)


class RequestRecord:
    """The observability of one `SafeCoDe.stream` call (see the module docstring)."""

    def __init__(
        self, span: Any, audit: AuditLog | None, scope: RequestScope | None, model: str,
        messages: Sequence[Any], steered_steps: int, kind: str = "chat",
    ) -> None:
        self.kind = kind
        self.span = span
        self.audit = audit
        self.scope = scope
        self.model = model
        self.steered_steps = steered_steps
        self.clock = tracing.Clock()
        self.verdict: Verdict | None = None
        self.digest: str | None = None
        self.text: list[dict[str, Any]] | None = None
        self.set_content(messages)  # now: the caller may reuse its message objects after the call
        self._done = threading.Lock()
        self._finished = False
        self.held_error: BaseException | None = None

    @classmethod
    def start(
        cls, model: str, messages: Sequence[Any], options: Mapping[str, Any], audit: AuditLog | None,
        steered_steps: int, *, kind: str = "chat",
    ) -> RequestRecord | None:
        """`kind`: "chat" (an answer) or "input_check" (a verdict only, e.g. a NeMo input rail)."""
        scope = current_scope()
        if scope is not None and scope.audit is not None:
            audit = scope.audit
        span = tracing.start_span(f"chat {model}" if kind == "chat" else f"safecode.{kind}")
        if span is None and audit is None and not (scope and scope.observers):
            return None  # tracing off, no audit log: nothing to do for this request
        if span is not None:
            span.set_attributes(tracing.request_attributes(model, options) if kind == "chat"
                                else {"gen_ai.request.model": model})
        return cls(span, audit, scope, model, messages, steered_steps, kind)

    def set_content(self, messages: Sequence[Any]) -> None:
        """What the audit line says of the request's content: its digest (and text when opted in)."""
        if self.audit is not None:
            self.digest = content_sha256(messages)
            self.text = content_text(messages) if self.audit.content else None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The request span as the current span (the judge's span becomes its child); a failure here ends the record."""
        try:
            with tracing.use_span(self.span):
                yield
        except BaseException as exc:
            held = _HELD.get()
            if held is None:
                self.finish(None, error=exc)
            else:
                self.held_error = exc
                held.records.append(self)
            raise

    def decided(self, verdict: Verdict | None) -> None:
        self.verdict = verdict
        if self.span is not None and verdict is not None:
            self.span.set_attributes(tracing.verdict_attributes(verdict))

    def discard(self) -> None:
        """The request was dropped before it was queued (e.g. to be asked again under the same
        verdict): its span ends marked `safecode.superseded`; no audit line, no observers."""
        with self._done:
            if self._finished:
                return
            self._finished = True
        if self.span is not None:
            self.span.set_attribute("safecode.superseded", True)
            self.span.end()

    def finish(
        self, job: DecodeJob | None, result: SafeCoDeResult | None = None, error: BaseException | None = None,
        cancelled: bool = False,
    ) -> None:
        """End the span, write the audit line, tell the observers (once; later calls do nothing; never raises)."""
        with self._done:
            if self._finished:
                return
            self._finished = True
        try:
            summary = self._summary(job, result, error, cancelled)
            if self.span is not None:
                self._end_span(job, result, error, cancelled)
            if self.audit is not None:
                self.audit.write(self._line(summary))
            for observe in self.scope.observers if self.scope is not None else ():
                observe(summary)
        except Exception:  # observability must never fail the request it observes
            logging.getLogger("safecode_guard.observability").exception("recording a finished request failed")

    # -- what is recorded --------------------------------------------------------------------

    def _summary(
        self, job: DecodeJob | None, result: SafeCoDeResult | None, error: BaseException | None, cancelled: bool
    ) -> dict[str, Any]:
        if self.kind != "chat":
            outcome = "failed" if error is not None else "checked"
        else:
            outcome = "answered" if result is not None else "cancelled" if cancelled else "failed"
        timings = dict(result.timings) if result is not None else {}
        if result is None and job is not None and job.t_submit:
            timings["queue_s"] = max((job.t_start or job.t_end or time.perf_counter()) - job.t_submit, 0.0)
        summary: dict[str, Any] = {
            "outcome": outcome,
            "error_type": type(error).__name__ if error is not None else None,
            "finish_reason": result.finish_reason if result is not None else None,
            "prompt_tokens": result.usage.prompt_tokens if result is not None else (job.prompt_len if job else None),
            "completion_tokens": result.usage.completion_tokens if result is not None else (
                len(job.steering.generated) if job is not None else None),
            "refused": result.refused if result is not None else None,
            "timings": timings,
            "latency_s": time.perf_counter() - self.clock.perf,
        }
        return summary

    def _line(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        # judges (and their guard models) load only when an audited request needs the code
        from ..judges import judge_error_code

        v = self.verdict
        span_context = self.span.get_span_context() if self.span is not None else None
        scope = self.scope
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(self.clock.ns / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "kind": self.kind,
            "request_id": scope.request_id if scope is not None else None,
            "trace_id": format(span_context.trace_id, "032x") if span_context is not None else None,
            "api_key_id": scope.api_key_id if scope is not None else None,
            "model": self.model,
            "judge": v.judge if v is not None else None,
            "verdict": v.label if v is not None else None,
            "unsafe_score": v.unsafe_score if v is not None else None,
            "source": v.source if v is not None else None,
            "judge_error": judge_error_code(v.error) if v is not None else None,
            "categories": list(v.categories) if v is not None and v.categories else [],
            "refused": summary["refused"],
            "outcome": summary["outcome"],
            "error_type": summary["error_type"],
            "finish_reason": summary["finish_reason"],
            "prompt_tokens": summary["prompt_tokens"],
            "completion_tokens": summary["completion_tokens"],
            "latency_s": round(summary["latency_s"], 4),
            "content_sha256": self.digest,
        }
        if self.text is not None:
            line["content"] = self.text
        return line

    def _end_span(
        self, job: DecodeJob | None, result: SafeCoDeResult | None, error: BaseException | None, cancelled: bool
    ) -> None:
        span = self.span
        if job is not None and job.t_start:
            self._stages(job)
        if result is not None:
            span.set_attributes({
                "gen_ai.response.model": self.model,
                "gen_ai.response.finish_reasons": [result.finish_reason],
                "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
                "gen_ai.usage.output_tokens": result.usage.completion_tokens,
                "safecode.steered_steps": self.steered_steps,
                "safecode.refused": result.refused,
            })
        if self.scope is not None and self.scope.request_id is not None:
            span.set_attribute("gen_ai.response.id", self.scope.request_id)
        if error is not None:
            tracing.mark_error(span, error)
        elif cancelled:
            span.set_attribute("safecode.cancelled", True)
        span.end(end_time=self.clock.to_ns(job.t_end) if job is not None and job.t_end else None)

    def _stages(self, job: DecodeJob) -> None:
        """Queue, prefill, window and decode as children of the request span, from the job's timestamps."""
        ns = self.clock.to_ns
        end = job.t_end or time.perf_counter()
        stages = [("safecode.queue", job.t_submit, job.t_start), ("safecode.prefill", job.t_start, job.t_first or end)]
        if job.t_first:
            window = job.steering.window
            closed = job.steering.window_closed_at
            window_end = closed or end
            if window > 0:
                stages.append(("safecode.window", job.t_first, window_end))
            if closed or window == 0:
                stages.append(("safecode.decode", closed or job.t_first, end))
        for name, start, stop in stages:
            # whether the window contrasted the real image with its noised copy (two rows) or not
            attrs = {"safecode.contrastive": job.steering.contrastive} if name == "safecode.window" else None
            tracing.child_span(self.span, name, ns(start), ns(stop), attrs)


@contextlib.contextmanager
def observed_check(
    model: str, messages: Sequence[Any], audit: AuditLog | None, kind: str = "input_check"
) -> Iterator[Callable[[Verdict], None]]:
    """Trace and audit a decision that produces no answer (a rail's input check, the answer check):
    call the yielded function with the verdict. A `safecode.<kind>` span (the judge's span inside
    it) and one audit line of that kind; nothing when nobody listens. `messages` may be filled in
    inside the block (they are read when the verdict is given)."""
    record = RequestRecord.start(model, messages, {}, audit, 0, kind=kind)
    if record is None:
        yield lambda verdict: None
        return

    def decided(verdict: Verdict) -> None:
        record.set_content(messages)
        record.decided(verdict)

    with record.active():
        yield decided
    record.finish(None)
