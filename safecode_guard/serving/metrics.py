"""Prometheus metrics of one server (one registry per app, so tests and replicas never share counters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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
            "safecode_request_latency_seconds", "Seconds from request to last token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "safecode_time_to_first_token_seconds", "Seconds from request to the first answer text.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("safecode_queue_depth", "Requests waiting for a place in the batch.", registry=r)
        self.active_rows = Gauge("safecode_active_rows", "Rows in the model's current decode batch.", registry=r)

    def watch_scheduler(self, depth: Callable[[], float], rows: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)
        self.active_rows.set_function(rows)

    def record_answer(self, safety: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        self.verdicts.labels(label=str(safety.get("verdict")), source=str(safety.get("source"))).inc()
        if safety.get("source") == "fallback":
            self.judge_errors.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
