"""Prometheus metrics of one server (one registry per app, so tests and replicas never share counters).

Buckets are fixed (below) and no label takes a client-supplied value: labels
are HTTP status codes, verdict labels and sources, and request outcomes.
What the scheduler counts (decode steps by batch size) and what the audit log
counts (failed writes) is read at scrape time, so the decode loop never
touches a metric.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
"""Seconds: whole requests and time to first token."""
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: the judge and the queue wait (usually well under a request's latency)."""
TOKENS_PER_SECOND_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
"""Decoding speed of one request (completion tokens / decode seconds)."""
BATCH_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Rows in one decode step (a request in its SafeCoDe window with an image holds two)."""

_OUTCOMES = ("answered", "cancelled", "failed")


class Metrics:
    """The counters, histograms and gauges `/metrics` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("safecode_requests", "Chat-completion requests by HTTP status.", ["status"], registry=r)
        self.verdicts = Counter("safecode_verdicts", "Verdicts by label and source.", ["label", "source"], registry=r)
        self.judge_errors = Counter("safecode_judge_errors", "Requests whose judge failed (fallback verdicts).", registry=r)
        self.prompt_tokens = Counter("safecode_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.completion_tokens = Counter("safecode_completion_tokens", "Tokens generated.", registry=r)
        self.latency = Histogram(
            "safecode_request_latency_seconds", "Seconds from request to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "safecode_time_to_first_token_seconds", "Seconds from request to the first answer text.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.judge_latency = Histogram(
            "safecode_judge_latency_seconds", "Seconds the judge took per decoded request (0 for an overridden verdict).",
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "safecode_queue_wait_seconds", "Seconds a request waited for a place in the batch.",
            buckets=STAGE_BUCKETS, registry=r,
        )
        self.tokens_per_second = Histogram(
            "safecode_decode_tokens_per_second", "Decoding speed per answered request (tokens after the first / s).",
            buckets=TOKENS_PER_SECOND_BUCKETS, registry=r,
        )
        self.finished = Counter(
            "safecode_engine_requests", "Requests the engine finished, by outcome (answered, cancelled, failed).",
            ["outcome"], registry=r,
        )
        for outcome in _OUTCOMES:
            self.finished.labels(outcome=outcome)  # every series exists from the start
        self.in_flight = Gauge("safecode_requests_in_flight", "Chat-completion requests being handled now.", registry=r)
        self.queue_depth = Gauge("safecode_queue_depth", "Requests waiting for a place in the batch.", registry=r)
        self.active_rows = Gauge("safecode_active_rows", "Rows (KV-cache rows) in the model's current decode batch.", registry=r)
        self.preparing = Gauge(
            "safecode_requests_preparing", "Requests being prepared: images, prompt and judge, before the queue.", registry=r
        )
        self.prefilling = Gauge(
            "safecode_requests_prefilling", "Requests taken from the queue whose prompts are being prefilled.", registry=r
        )
        self._scrape = _ScrapeTime()
        r.register(self._scrape)

    def watch_scheduler(self, depth: Callable[[], float], rows: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.active_rows.set_function(rows)

    def watch_engine(self, scheduler: Any) -> None:
        """Read every stage of the model's scheduler at scrape time: preparing, queued, prefilling, decoding rows."""
        self.watch_scheduler(lambda: scheduler.queue_depth, lambda: scheduler.active_rows)
        self.preparing.set_function(lambda: scheduler.preparing_requests)
        self.prefilling.set_function(lambda: scheduler.prefilling_requests)
        self._scrape.scheduler = scheduler

    def watch_audit(self, audit: Any) -> None:
        """Expose `audit.write_errors` as `safecode_audit_write_errors_total`."""
        self._scrape.audit = audit

    def record_answer(self, safety: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        self.verdicts.labels(label=str(safety.get("verdict")), source=str(safety.get("source"))).inc()
        if safety.get("source") == "fallback":
            self.judge_errors.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def observe_request(self, summary: Mapping[str, Any]) -> None:
        """A finished engine request (`RequestRecord`'s summary): its outcome and stage timings."""
        outcome = summary.get("outcome")
        if outcome in _OUTCOMES:
            self.finished.labels(outcome=outcome).inc()
        timings = summary.get("timings") or {}
        if "queue_s" in timings:
            self.queue_wait.observe(timings["queue_s"])
        if outcome != "answered":
            return
        self.judge_latency.observe(timings.get("judge_s", 0.0))
        decode_s, tokens = timings.get("decode_s", 0.0), (summary.get("completion_tokens") or 0) - 1
        if decode_s > 0 and tokens > 0:  # the first token comes with the prefill
            self.tokens_per_second.observe(tokens / decode_s)


class _ScrapeTime(Collector):
    """Values kept elsewhere, read when `/metrics` is scraped."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.audit: Any = None

    def collect(self) -> Iterator[Any]:
        if self.scheduler is not None:
            counts = dict(self.scheduler.step_rows)  # a copy: the decode loop adds to it meanwhile
            buckets, total = [], 0
            for le in BATCH_ROWS_BUCKETS:
                total = sum(n for rows, n in counts.items() if rows <= le)
                buckets.append((str(le), total))
            buckets.append(("+Inf", sum(counts.values())))
            yield HistogramMetricFamily(
                "safecode_batch_rows", "Rows in each decode step of the model (its batch size).",
                buckets=buckets, sum_value=sum(rows * n for rows, n in counts.items()),
            )
        if self.audit is not None:
            yield CounterMetricFamily(
                "safecode_audit_write_errors", "Audit-log lines that could not be written (full disk, unwritable path).",
                value=self.audit.write_errors,
            )
