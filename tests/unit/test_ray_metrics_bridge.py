"""`RayMetricsBridge`: a replica's Prometheus samples copied into Ray gauges."""

from __future__ import annotations

from typing import Any

from safecode_guard.serving.metrics import Metrics
from safecode_guard.serving.ray_metrics import RayMetricsBridge


class FakeGauge:
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.description, self.tag_keys = name, description, tag_keys
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert set(tags or {}) == set(self.tag_keys)  # Ray refuses tags it was not told about
        self.values[tuple(sorted((tags or {}).items()))] = value


def test_every_sample_becomes_a_gauge_with_its_labels_and_follows_later_values():
    made: dict[str, FakeGauge] = {}

    def factory(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        made[name] = FakeGauge(name, description, tag_keys)
        return made[name]

    metrics = Metrics()
    metrics.requests.labels(status="200").inc(3)
    metrics.latency.observe(0.2)
    bridge = RayMetricsBridge(metrics.registry, gauge_factory=factory)
    assert bridge.sync() > 0
    assert made["safecode_requests_total"].values == {(("status", "200"),): 3.0}
    assert made["safecode_request_latency_seconds_bucket"].values[(("le", "0.25"),)] == 1.0
    assert made["safecode_request_latency_seconds_bucket"].values[(("le", "0.1"),)] == 0.0
    assert made["safecode_request_latency_seconds_count"].values == {(): 1.0}
    assert not any(name.endswith("_created") for name in made)
    assert made["safecode_requests_total"].description.startswith("Chat-completion requests")
    metrics.requests.labels(status="200").inc()
    metrics.requests.labels(status="429").inc()
    before = dict(made)
    bridge.sync()
    assert made["safecode_requests_total"] is before["safecode_requests_total"]  # one gauge per name and label set
    assert made["safecode_requests_total"].values == {(("status", "200"),): 4.0, (("status", "429"),): 1.0}


def test_the_copy_thread_runs_until_closed():
    calls: list[str] = []

    class Registry:
        def collect(self) -> list[Any]:
            calls.append("collect")
            return []

    bridge = RayMetricsBridge(Registry(), interval_s=0.01, gauge_factory=lambda *a: None).start()
    import time

    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    bridge.close()
    count = len(calls)
    time.sleep(0.05)
    assert count >= 3 and len(calls) == count


def test_app_builder_args_carry_the_audit_log_and_a_replica_placeholder():
    from safecode_guard.serving.ray_serve import settings_from_args

    settings, _ = settings_from_args({"model": "demo", "audit_log": "/var/log/safecode/{replica}.jsonl",
                                      "audit_log_content": "true"})
    assert settings.audit_log == "/var/log/safecode/{replica}.jsonl" and settings.audit_log_content is True
