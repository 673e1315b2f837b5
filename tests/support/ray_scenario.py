"""The Ray Serve scenario of `tests/serving/test_ray_serve.py`, run inside a fresh network namespace.

    unshare -n sh -c 'ip link set lo up && python tests/support/ray_scenario.py MODEL_DIR'

Starts a local Ray (loopback only), serves `app_builder` with two replicas of
a tiny model, and prints one JSON line: which replica answered each request,
what happened around a replica killed mid-test, every TCP socket Ray held,
the time from `serve.run` to ready, and whether any Ray process outlived
the shutdown. The test asserts on it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    return [line.strip() for line in out if any(k in line for k in ("raylet", "gcs_server", "ray::", "dashboard"))]


def tcp_sockets() -> list[str]:
    lines = subprocess.run(["ss", "-tanpH"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in lines if line.strip()]


def main() -> None:
    import ray
    from ray import serve

    from safecode_guard.serving.ray_serve import app_builder

    model = sys.argv[1]
    port = free_port()
    result: dict = {}
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        started = time.perf_counter()
        serve.run(
            app_builder({"model": model, "judge": "fixed:safe", "num_replicas": 2, "max_new_tokens": 4,
                         "api_key": "ray-key"}),
            name="safecode", route_prefix="/", blocking=False,
        )
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 240:
                raise TimeoutError("not ready in 240 s")
            time.sleep(0.2)
        # ready means one replica answers; wait until both do
        while serve.status().applications["safecode"].status != "RUNNING":
            time.sleep(0.2)
        result["ready_s"] = round(time.perf_counter() - started, 1)

        headers = {"Authorization": "Bearer ray-key"}
        body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

        def ask() -> tuple[int, str | None, dict | None]:
            try:
                r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
                return r.status_code, r.headers.get("x-safecode-instance"), (r.json() if r.status_code == 200 else None)
            except httpx.HTTPError as exc:
                return -1, type(exc).__name__, None

        spread = [ask() for _ in range(24)]
        result["spread"] = [(status, inst) for status, inst, _ in spread]
        result["safety"] = spread[0][2]["safety"] if spread[0][2] else None
        result["unauthorised"] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code
        result["metrics_has_requests"] = "safecode_requests_total" in httpx.get(f"{url}/metrics", headers=headers, timeout=30).text

        # kill one replica while requests are in flight
        victim = spread[0][1]
        victim_pid = int(victim.rsplit("@", 1)[1])
        during: list = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                during.append(ask())

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.0)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        time.sleep(3.0)
        stop.set()
        for w in workers:
            w.join()
        result["victim"] = victim
        result["during"] = [(status, inst) for status, inst, _ in during]
        after = [ask() for _ in range(12)]
        result["after"] = [(status, inst) for status, inst, _ in after]
        result["after_kill_s"] = round(time.perf_counter() - killed_at, 1)
        # a replica whose model cannot load never comes up: Serve reports the deployment failed,
        # while the healthy application keeps answering
        try:
            serve.run(
                app_builder({"model": "/nonexistent/model", "judge": "fixed:safe", "num_replicas": 1}),
                name="broken", route_prefix="/broken", blocking=False,
            )
        except RuntimeError as exc:  # serve.run waits for the application and reports its failure
            result["broken_error"] = str(exc)
        result["broken_status"] = str(serve.status().applications["broken"].status)
        result["still_answering"] = ask()[0]
        result["sockets"] = tcp_sockets()
        result["addresses"] = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout.splitlines()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    deadline = time.time() + 30
    while ray_processes() and time.time() < deadline:
        time.sleep(0.5)
    result["left_over"] = ray_processes()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
