"""`safecode-guard bench-serve`: latency, time to first token and tokens/s of a running server.

    safecode-guard bench-serve --url http://127.0.0.1:8000 --concurrency 1,8,32 --requests 64

or, to start a server for the run and stop it afterwards (by its PID, SIGTERM):

    safecode-guard bench-serve --model ./my-vlm --judge fixed:safe --concurrency 1,8,32

For each level, `--requests` streamed chat completions (each with an image
unless `--no-image`) are sent by that many concurrent clients over loopback
or the network; the client measures time to the first text event and to
`[DONE]`, and reads the token counts from `stream_options.include_usage`.
Printed per level: requests/s, completion tokens/s, p50 / p99 latency and
p50 / p99 time to first token, and how many requests failed (by status).

`--compare-tracing` (with `--model`) starts two servers, one with tracing
off and one exporting every span over OTLP/HTTP (to a sink in this process
that accepts and drops them), and runs each level on both in alternating
rounds (`--rounds`, off then on, each round a share of `--requests`), so a
load that changes during the run weighs on both rows marked `off` and `on`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .scene import scene_image

__all__ = ["configure_parser", "run_command", "run_load"]


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def merged(self, other: LevelResult) -> LevelResult:
        """This level's numbers and `other`'s (a later round of the same level) as one."""
        return LevelResult(
            self.concurrency, self.requests + other.requests, self.wall_s + other.wall_s,
            self.latencies + other.latencies, self.ttfts + other.ttfts, self.tokens + other.tokens,
            self.errors + other.errors,
        )

    def row(self) -> str:
        def pct(values: list[float], q: int) -> float:
            if not values:
                return float("nan")
            if len(values) == 1:
                return values[0]
            return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]

        ok = len(self.latencies)
        errors = ",".join(f"{k}x{v}" for k, v in sorted(self.errors.items())) or "-"
        return (
            f"{self.concurrency:>5} {self.requests:>5} {ok / self.wall_s:>7.2f} {self.tokens / self.wall_s:>8.1f} "
            f"{pct(self.latencies, 50):>8.3f} {pct(self.latencies, 99):>8.3f} "
            f"{pct(self.ttfts, 50):>8.3f} {pct(self.ttfts, 99):>8.3f}  {errors}"
        )


HEADER = f"{'conc':>5} {'reqs':>5} {'req/s':>7} {'tok/s':>8} {'p50 lat':>8} {'p99 lat':>8} {'p50 TTFT':>8} {'p99 TTFT':>8}  errors"


def _image_url() -> str:

    buf = io.BytesIO()
    scene_image(96).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _one(client: Any, url: str, body: dict[str, Any], result: LevelResult) -> None:
    start = time.perf_counter()
    first: float | None = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                result.errors[str(response.status_code)] += 1
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    result.errors["stream-error"] += 1
                    return
                if first is None and any((c.get("delta") or {}).get("content") for c in event.get("choices", [])):
                    first = time.perf_counter() - start
                if event.get("usage"):
                    result.tokens += int(event["usage"]["completion_tokens"])
    except Exception as exc:  # a load test reports failures, it does not stop at the first
        result.errors[type(exc).__name__] += 1
        return
    result.latencies.append(time.perf_counter() - start)
    if first is not None:
        result.ttfts.append(first)


async def run_load(
    base_url: str, *, concurrency: int, requests: int, max_tokens: int, api_key: str | None, image: bool
) -> LevelResult:
    """Send `requests` streamed completions from `concurrency` clients; measure each."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    content: Any = "Describe the scene, then say whether anything in it is dangerous."
    if image:
        content = [{"type": "text", "text": content}, {"type": "image_url", "image_url": {"url": _image_url()}}]
    body = {
        # no `model`: the server answers with its own (another name would be a 404)
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "stream": True, "stream_options": {"include_usage": True},
    }
    result = LevelResult(concurrency, requests, 0.0)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await _one(client, f"{base_url}/v1/chat/completions", body, result)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def configure_parser(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", default=None, help="start `safecode-guard serve --model MODEL` for the run instead")
    parser.add_argument("--judge", default="fixed:safe", help="judge of the server started with --model (default: fixed:safe)")
    parser.add_argument("--api-key", default=None, help="Bearer key of the server (default: $SAFECODE_API_KEY)")
    parser.add_argument("--concurrency", default="1,8,32", help="client counts, e.g. 1,8,32 (default)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (default: 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    parser.add_argument("--no-image", action="store_true", help="text-only requests")
    parser.add_argument("--compare-tracing", action="store_true",
                        help="with --model: each level on two servers, tracing off and on (OTLP/HTTP to a local sink), side by side")
    parser.add_argument("--rounds", type=int, default=4, help="with --compare-tracing: alternating off/on rounds per level (default: 4)")


def run_command(args: argparse.Namespace) -> int:
    import os

    try:
        levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
        if not levels or min(levels) < 1 or args.requests < 1 or args.max_tokens < 1:
            raise ValueError
    except ValueError:
        print("error: --concurrency takes counts like 1,8,32; --requests and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("SAFECODE_API_KEY")
    if args.compare_tracing and args.url is not None:
        print("error: --compare-tracing starts its own two servers: give --model, not --url", file=sys.stderr)
        return 2
    servers: list[tuple[str, Any, str]] = []  # (label, process or None, base URL)
    sink = None
    try:
        if args.url is not None:
            servers.append(("", None, args.url.rstrip("/")))
        elif args.compare_tracing:
            sink = _SpanSink()
            for label, extra in (("off", []), ("on", ["--otlp-endpoint", sink.url])):
                proc, url = _start_server(args.model or "demo", args.judge, extra)
                servers.append((label, proc, url))
        else:
            proc, url = _start_server(args.model or "demo", args.judge)
            servers.append(("", proc, url))
        label_width = 8 if args.compare_tracing else 0
        print(f"[bench-serve] {', '.join(url for _, _, url in servers)}: {args.requests} streamed requests per level, "
              f"{args.max_tokens} tokens each", file=sys.stderr)
        print(("tracing " if label_width else "") + HEADER)
        rounds = max(1, args.rounds) if args.compare_tracing else 1
        for level in levels:
            merged: dict[str, LevelResult] = {}
            for i in range(rounds):
                share = args.requests // rounds + (1 if i < args.requests % rounds else 0)
                for label, _, url in servers:
                    result = asyncio.run(run_load(
                        url, concurrency=level, requests=share, max_tokens=args.max_tokens,
                        api_key=api_key, image=not args.no_image,
                    ))
                    merged[label] = merged[label].merged(result) if label in merged else result
            for label, result in merged.items():
                print((f"{label:>7} " if label_width else "") + result.row(), flush=True)
    finally:
        for _, proc, _ in servers:
            if proc is not None:
                _stop_server(proc)
        if sink is not None:
            sink.close()
            print(f"[bench-serve] the tracing server exported {sink.batches} OTLP batches ({sink.bytes} bytes)", file=sys.stderr)
    return 0


class _SpanSink:
    """An OTLP/HTTP receiver on 127.0.0.1 that accepts span batches and drops them (for --compare-tracing)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.batches = self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                sink.batches += 1
                sink.bytes += len(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _start_server(model: str, judge: str, extra: list[str] | None = None) -> tuple[Any, str]:
    import socket
    import subprocess

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "safecode_guard.cli", "serve", "--model", model, "--judge", judge,
               "--port", str(port), "--log-level", "warning", *(extra or [])]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    print(f"[bench-serve] starting a server for {model} (pid {proc.pid}) ...", file=sys.stderr, flush=True)
    while time.perf_counter() - started < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                print(f"[bench-serve] ready after {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("the server was not ready within 600 s")


def _stop_server(proc: Any) -> None:
    import signal

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except Exception:
        proc.kill()
