"""Ray Serve (`safecode_guard.serving.ray_serve`): the same API on many replicas.

The scenario (`tests/support/ray_scenario.py`) runs in a fresh network namespace with
only a loopback interface (`unshare -n`, then `ip link set lo up`), with
`ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)` and
`RAY_USAGE_STATS_ENABLED=0`: two replicas of a tiny model behind Serve's proxy.
It reports which replica answered each request, what happened when one was
killed, Ray's sockets and whether any Ray process outlived the shutdown.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml
from support import REPO

from safecode_guard.errors import SafeCoDeInputError
from safecode_guard.serving.ray_serve import settings_from_args

ROOT = REPO
LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]", "127.0.0.53")


def test_args_map_to_settings_and_deployment_options():
    settings, parsed = settings_from_args({
        "model": "/models/x", "judge": "fixed:safe", "num_replicas": "2", "num_gpus": "0.5", "alpha": "0.5",
        "batching": '{"max_queue": 8}', "policy": {"max_images": 2}, "public_metrics": "true",
    })
    assert (settings.model, settings.judge, settings.safecode.alpha) == ("/models/x", "fixed:safe", 0.5)
    assert (settings.batching.max_queue, settings.policy.max_images, settings.public_metrics) == (8, 2, True)
    assert (parsed.num_replicas, parsed.num_gpus, parsed.max_ongoing_requests) == (2, 0.5, 64)
    with pytest.raises(SafeCoDeInputError, match="did you mean 'model'"):
        settings_from_args({"modle": "x"})
    with pytest.raises(SafeCoDeInputError, match="not both"):
        settings_from_args({"num_replicas": 2, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}})
    with pytest.raises(SafeCoDeInputError, match="alpha"):
        settings_from_args({"alpha": "-1"})


def _build(import_path: str, args: dict):
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)(args)


def test_the_serve_config_and_the_kuberay_manifest_build_the_application():
    from ray.serve.deployment import Application

    config = yaml.safe_load((ROOT / "integrations" / "ray" / "serve_config.yaml").read_text())
    manifest = yaml.safe_load((ROOT / "integrations" / "ray" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"].startswith("ray.io/")
    embedded = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    for app in [*config["applications"], *embedded["applications"]]:
        built = _build(app["import_path"], app["args"])
        assert isinstance(built, Application)
        deployment = built._bound_deployment
        assert deployment.num_replicas == app["args"]["num_replicas"]
        assert deployment.ray_actor_options["num_gpus"] == app["args"]["num_gpus"]
        settings = json.loads(built._bound_deployment.init_args[0])
        assert settings["model"] == app["args"]["model"] and settings["api_key"] is None


def test_replica_health_follows_the_model_and_the_scheduler(tmp_path, tiny_model_dir):
    from safecode_guard.serving.app import ModelHost
    from safecode_guard.serving.ray_serve import check_replica_health
    from safecode_guard.serving.settings import ServerSettings

    broken = ModelHost(ServerSettings(model=str(tmp_path / "no-such-model"), judge="fixed:safe"))
    with pytest.raises(SafeCoDeInputError, match="not found"):
        broken.load()  # what a replica's constructor runs: the replica never comes up
    with pytest.raises(RuntimeError, match="not loaded"):
        check_replica_health(broken)
    host = ModelHost(ServerSettings(model=str(tiny_model_dir("llava")), judge="fixed:safe"))
    host.load()
    check_replica_health(host)  # healthy: no exception
    scheduler = host.engine.scheduler
    with scheduler._cond:
        scheduler._waiting.append(SimpleNamespace(followers=[]))  # a request waiting, and no worker to serve it
        try:
            with pytest.raises(RuntimeError, match="scheduler"):
                check_replica_health(host)
        finally:
            scheduler._waiting.clear()


def test_two_replicas_on_loopback_spread_survive_a_kill_and_shut_down_clean(tiny_model_dir):
    model = str(tiny_model_dir("llava"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    command = ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" tests/support/ray_scenario.py "{model}"']
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario and every Ray process it started (its session)
        out, err = proc.communicate()
        pytest.fail(f"the Ray scenario did not finish in 420 s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario failed (exit {proc.returncode}):\n{err[-5000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))

    # requests spread over both replicas (each response names the replica that answered)
    spread = Counter(instance for status, instance in result["spread"] if status == 200)
    assert len(result["spread"]) == sum(spread.values()) and len(spread) == 2, result["spread"]
    assert result["safety"]["verdict"] == "safe" and result["unauthorised"] == 401 and result["metrics_has_requests"]

    # a replica killed mid-test: its requests in flight fail cleanly (a 5xx, never a hang), the rest are answered
    during = result["during"]
    assert all(status == 200 or 500 <= status < 600 for status, _ in during), during
    assert all(status == 200 for status, _ in result["after"]) and result["after"]
    assert all(instance != result["victim"] for _, instance in result["after"])

    # a replica whose model fails to load never comes up (Serve marks the application failed)
    assert result["broken_status"].endswith("DEPLOY_FAILED") and "broken" in result["broken_error"]
    assert result["still_answering"] == 200

    # loopback only: the namespace has no other interface, and no Ray socket uses another address
    assert all(" lo " in line or ": lo" in line for line in result["addresses"]), result["addresses"]
    for line in result["sockets"]:
        fields = line.split()
        state, local, peer = fields[0], fields[3], fields[4]
        for address in (local, peer):
            host = address.rsplit(":", 1)[0]
            assert host in LOOPBACK or (state == "LISTEN" and host in ("*", "0.0.0.0", "[::]")), line

    # shutdown leaves no Ray process behind
    assert result["left_over"] == []
    print(f"\nray serve: ready {result['ready_s']} s after serve.run; spread {dict(spread)}; "
          f"during the kill {Counter(s for s, _ in during)}")
