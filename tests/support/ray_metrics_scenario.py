"""Ray metrics export of two replicas' server metrics, run inside a fresh network namespace:

    unshare -n sh -c 'ip link set lo up && python tests/support/ray_metrics_scenario.py'

Starts a local Ray (loopback only) with a metrics export port, serves a deployment of two
replicas that each hold the server's `Metrics` and a `RayMetricsBridge`, sends six requests, and
prints one JSON line: the `ray_safecode_requests_total` samples of Ray's export (one scrape).
"""

from __future__ import annotations

import json
import os
import socket
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx
import ray
from ray import serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@serve.deployment(num_replicas=2)
class Replica:
    def __init__(self) -> None:
        from safecode_guard.serving.metrics import Metrics
        from safecode_guard.serving.ray_metrics import RayMetricsBridge

        self.metrics = Metrics()
        self.bridge = RayMetricsBridge(self.metrics.registry, interval_s=0.5).start()

    def __call__(self, request: object) -> str:
        self.metrics.requests.labels(status="200").inc()
        return serve.get_replica_context().replica_id.unique_id


def main() -> None:
    metrics_port = free_port()
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, _metrics_export_port=metrics_port, num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(Replica.bind(), name="safecode", route_prefix="/")
        served: dict[str, int] = {}
        for _ in range(12):
            replica = handle.remote(None).result()
            served[replica] = served.get(replica, 0) + 1
        samples: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            except httpx.HTTPError:
                text = ""
            samples = {}
            for line in text.splitlines():
                if line.startswith("ray_safecode_requests_total{"):
                    labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].split(","))
                    samples[labels["replica"].strip('"') + "|" + labels.get("status", "").strip('"')
                            + "|" + labels.get("application", "").strip('"')] = float(line.rsplit(" ", 1)[1])
            if sum(samples.values()) >= 12:
                break
            time.sleep(1)
        print(json.dumps({"served": served, "samples": samples}), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
