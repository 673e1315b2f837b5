"""Real servers for the serving tests: uvicorn on 127.0.0.1, in a subprocess or in a thread.

`ServerProcess.start(args)` runs `safecode-guard serve ARGS` (or, with
`keyword_judge`, the same app through `python tests/support/servers.py`, whose
judge calls a request unsafe when it mentions a keyword: deterministic
verdicts for load tests). `ThreadServer` runs an app in this process, so tests
can script the model's tokens. Both bind 127.0.0.1 on a free port and are
stopped by their own handle (the process by its PID).
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
from pathlib import Path
from typing import Any

import httpx

UNSAFE_WORD = "detonator"
REPO = Path(__file__).resolve().parents[2]  # this file also runs as a script, outside the `support` package


def allow_loopback() -> None:
    """Let this process talk to 127.0.0.1 (and nothing else) even outside a test's own setup,
    e.g. in a module-scoped fixture that pytest-socket's per-test marker does not cover."""
    from pytest_socket import socket_allow_hosts

    socket_allow_hosts(["127.0.0.1"], allow_unix_socket=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


def keyword_judge(request: Any) -> str:
    """Unsafe exactly when the conversation mentions UNSAFE_WORD."""
    texts = [request.request] + [
        p.get("text", "") for m in request.conversation for p in (m.get("content") or []) if isinstance(p, dict)
    ]
    return "unsafe" if any(UNSAFE_WORD in t for t in texts) else "safe"


class ServerProcess:
    """A server subprocess; `stop()` sends SIGTERM to its PID and returns its exit code."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, args: list[str], *, keyword: bool = False, timeout: float = 120.0) -> ServerProcess:
        allow_loopback()
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        if keyword:
            command = [sys.executable, str(Path(__file__).resolve()), json.dumps({"port": port, "args": args})]
        else:
            command = [sys.executable, "-m", "safecode_guard.cli", "serve", "--port", str(port), *args]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout, proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return cls(proc, url)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process."""

    def __init__(self, app: Any, ready_path: str = "/ready") -> None:
        import uvicorn

        self.ready_path = ready_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        allow_loopback()
        self.thread.start()
        wait_ready(self.url, path=self.ready_path)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _main() -> None:
    """The keyword-judge server: `python tests/support/servers.py '{"port": N, "args": [...]}'`."""
    from safecode_guard.serve_cli import configure_parser, run_server, settings_from_args
    from safecode_guard.serving import create_app

    spec = json.loads(sys.argv[1])
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(spec["args"])
    settings = settings_from_args(args)
    app = create_app(settings, judge=keyword_judge)
    run_server(app, host="127.0.0.1", port=spec["port"], log_level="warning", limits=settings.connections)


if __name__ == "__main__":
    _main()
