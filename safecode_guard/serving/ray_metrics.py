"""A Ray Serve replica's `/metrics` in Ray's own metrics, so one scrape covers the application.

Through Ray Serve's proxy, `GET /metrics` reaches whichever replica the proxy
picks. Each replica therefore copies its Prometheus registry into Ray's
metrics system (`ray.serve.metrics.Gauge`) every few seconds; Ray adds the
`application`, `deployment` and `replica` labels and exports everything on
each node's metrics port (Ray's `--metrics-export-port`, which KubeRay's
PodMonitor / Prometheus service discovery already scrape), names prefixed
with `ray_`: `ray_safecode_requests_total{replica="..."}`.

Counters and histogram buckets arrive as gauges holding the same cumulative
values, so `rate()` and `histogram_quantile()` read them as usual. The copy
runs in its own thread and never touches a request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["RayMetricsBridge"]

logger = logging.getLogger("safecode_guard.serving")

DEFAULT_INTERVAL_S = 5.0


class RayMetricsBridge:
    """Copy `registry`'s samples into Ray gauges every `interval_s` (`start()`; `close()` stops it).

    `gauge_factory(name, description, tag_keys)` makes a gauge with `.set(value, tags=...)`; the
    default is `ray.serve.metrics.Gauge`, which adds the replica's labels.
    """

    def __init__(
        self, registry: Any, *, interval_s: float = DEFAULT_INTERVAL_S,
        gauge_factory: Callable[[str, str, tuple[str, ...]], Any] | None = None,
    ) -> None:
        if gauge_factory is None:
            from ray.serve.metrics import Gauge

            def gauge_factory(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
                return Gauge(name, description=description, tag_keys=tag_keys or None)

        self.registry = registry
        self.interval_s = interval_s
        self._make = gauge_factory
        self._gauges: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> int:
        """Copy every sample now; the number copied."""
        copied = 0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation timestamps: not a measurement
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self._gauges.get((sample.name, keys))
                if gauge is None:
                    gauge = self._gauges[(sample.name, keys)] = self._make(sample.name, family.documentation, keys)
                gauge.set(float(sample.value), tags=dict(sample.labels) or None)
                copied += 1
        return copied

    def start(self) -> RayMetricsBridge:
        self._thread = threading.Thread(target=self._run, name="safecode-ray-metrics", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception:  # a metrics hiccup must never take the replica down
                logger.exception("copying the metrics into Ray's failed; retrying in %.0f s", self.interval_s)
