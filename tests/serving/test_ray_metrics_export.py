"""On Ray Serve, every replica's server metrics reach Ray's metrics export with per-replica labels:
one scrape for the application (the proxy's `/metrics` is only the replica that answered)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

SCENARIO = Path(__file__).resolve().parents[1] / "support" / "ray_metrics_scenario.py"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) for a loopback-only namespace")
def test_two_replicas_metrics_in_one_scrape_of_rays_export():
    command = ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" "{SCENARIO}"']
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario and every Ray process it started (its session)
        out, err = proc.communicate()
        pytest.fail(f"the Ray metrics scenario did not finish in 300 s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"scenario failed (exit {proc.returncode}):\n{err[-5000:]}"
    result = json.loads(lines[-1])
    served = result["served"]
    assert sum(served.values()) == 12
    # each replica's own count, labelled with its replica id and the application, in one scrape
    expected = {f"{replica}|200|safecode": float(n) for replica, n in served.items()}
    assert result["samples"] == expected


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")  # Serve's async __del__
def test_a_replica_names_its_own_audit_file_and_copies_its_metrics(tiny_model_dir, tmp_path):
    from safecode_guard.serving.ray_serve import SafeCoDeServer, settings_from_args

    settings, _ = settings_from_args({"model": str(tiny_model_dir("llava")), "judge": "fixed:safe",
                                      "audit_log": str(tmp_path / "audit-{replica}.jsonl")})
    # the replica class outside Serve: Serve's ingress makes its __init__ a coroutine, which Serve awaits
    replica = SafeCoDeServer.__new__(SafeCoDeServer)
    asyncio.run(replica.__init__(settings.model_dump_json()))
    try:
        assert replica._asgi.state.audit.target == str(tmp_path / "audit-local.jsonl")  # "local": no replica id
        assert replica._metrics.sync() > 0  # the bridge reads this replica's registry
    finally:
        replica._metrics.close()
        replica._asgi.state.audit.close()
