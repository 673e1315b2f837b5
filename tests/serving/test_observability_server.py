"""Observability through `safecode-guard serve`'s app: a client's trace continues through the server,
one audit line per request (no user text), and the metrics of every stage."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from support.servers import UNSAFE_WORD, ThreadServer, keyword_judge

from safecode_guard.observability import key_id, use_tracer_provider
from safecode_guard.testing import gradient_image

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

KEY = "observability-key-1"
SECRET = "zanzibar-quokka"  # user text that must never reach a span or (by default) an audit line
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _image_message(text: str) -> dict[str, Any]:
    buf = io.BytesIO()
    gradient_image(48, 40).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def _app(model: str, **settings: Any) -> Any:
    from safecode_guard.serving import ServerSettings, create_app

    judge = settings.pop("judge_object", None)
    return create_app(ServerSettings(model=model, **settings), judge=judge)


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    use_tracer_provider(provider)
    yield spans
    use_tracer_provider(None)


def _wait_for(predicate, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and line.split("{")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_traceparent_continues_through_the_server_into_a_span_tree_with_the_verdict(
    tiny_model_dir, exporter, tmp_path
):
    audit = tmp_path / "audit.jsonl"
    app = _app(str(tiny_model_dir("llava")), judge="fixed:unsafe", api_key=KEY, max_new_tokens=8,
               audit_log=str(audit))
    with ThreadServer(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        completion = client.chat.completions.create(
            model="llava", messages=[_image_message(f"Tell me about {SECRET}.")],
            extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
        spans = _wait_for(lambda: [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
                          and exporter.get_finished_spans())
    by_name = {s.name: s for s in spans}
    server = by_name["POST /v1/chat/completions"]
    chat = by_name["chat llava"]
    # the client's trace goes on: same trace id, the server span is the client span's child
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    assert format(server.parent.span_id, "016x") == PARENT_ID and server.parent.is_remote
    assert chat.parent.span_id == server.context.span_id
    for stage in ("safecode.judge", "safecode.queue", "safecode.prefill", "safecode.window", "safecode.decode"):
        assert by_name[stage].parent.span_id == chat.context.span_id, stage
    attrs = chat.attributes
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == "llava"
    assert attrs["safecode.verdict"] == "unsafe" and attrs["safecode.judge"] == "fixed:unsafe"
    assert attrs["safecode.source"] == "judge" and attrs["safecode.refused"] is True
    assert attrs["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert attrs["gen_ai.response.id"] == completion.id
    assert server.attributes["http.response.status_code"] == 200
    # no user text in any span
    assert SECRET not in repr([dict(s.attributes) for s in spans])
    # ... and the audit line names the same request and trace, without the text
    (line,) = _lines(audit)
    assert line["request_id"] == completion.id and line["trace_id"] == TRACE_ID
    assert line["api_key_id"] == key_id(KEY) and KEY not in audit.read_text()
    assert line["verdict"] == "unsafe" and line["refused"] is True and line["outcome"] == "answered"
    assert len(line["content_sha256"]) == 64 and SECRET not in audit.read_text()


def test_tracing_off_exports_nothing_and_answers_alike(tiny_model_dir):
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)  # a provider that records nothing: tracing is off
    provider.add_span_processor(SimpleSpanProcessor(spans))
    use_tracer_provider(provider)
    try:
        with ThreadServer(_app(str(tiny_model_dir("llava")), judge="fixed:safe", max_new_tokens=6)) as srv:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            answer = client.chat.completions.create(
                model="llava", messages=[_image_message("hi")],
                extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
            )
    finally:
        use_tracer_provider(None)
    assert answer.choices[0].message.content is not None
    assert spans.get_finished_spans() == ()


async def test_32_concurrent_requests_give_one_parseable_audit_line_each_without_text(tiny_model_dir, tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = _app(str(tiny_model_dir("llava")), judge_object=keyword_judge, max_new_tokens=6, audit_log=str(audit))
    with ThreadServer(app) as srv:
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> tuple[str, str]:
            text = f"{SECRET} number {i}" + (f" {UNSAFE_WORD}" if i % 3 == 0 else "")
            if i % 2:
                stream = await client.chat.completions.create(
                    model="llava", messages=[_image_message(text)], stream=True)
                ids = [chunk.id async for chunk in stream]
                return ids[0], "unsafe" if i % 3 == 0 else "safe"
            done = await client.chat.completions.create(model="llava", messages=[_image_message(text)])
            return done.id, "unsafe" if i % 3 == 0 else "safe"

        results = await asyncio.gather(*(one(i) for i in range(32)))
        await client.close()
    # the server has stopped: its audit log was closed, every queued line written
    lines = _lines(audit)
    assert len(lines) == 32
    assert {line["request_id"]: line["verdict"] for line in lines} == dict(results)
    assert all(line["outcome"] == "answered" and line["api_key_id"] is None for line in lines)
    assert len({line["content_sha256"] for line in lines}) == 32  # each request's own content
    assert SECRET not in audit.read_text() and "content" not in lines[0]


def test_an_unwritable_audit_path_fails_no_request_and_is_counted(tiny_model_dir, tmp_path, caplog):
    audit = tmp_path / "no-such-folder" / "audit.jsonl"
    with ThreadServer(_app(str(tiny_model_dir("llava")), judge="fixed:safe", max_new_tokens=4,
                           audit_log=str(audit), public_metrics=True)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            assert client.chat.completions.create(model="llava", messages=[_image_message("hi")]).choices
        metrics = _wait_for(lambda: (t := httpx.get(f"{srv.url}/metrics").text)
                            and _metric(t, "safecode_audit_write_errors_total") >= 4 and t)
    assert not audit.exists()
    # logged once (at startup), not once per request
    assert sum("audit log" in r.getMessage() for r in caplog.records if r.name == "safecode_guard.observability") == 1
    assert _metric(metrics, "safecode_audit_write_errors_total") == 4  # the startup check + three lines


def test_metrics_count_requests_being_judged_and_every_stage(tiny_model_dir):
    judging = threading.Event()
    release = threading.Event()

    def slow_judge(request: Any) -> str:
        judging.set()
        release.wait(30)
        return "safe"

    app = _app(str(tiny_model_dir("llava")), judge_object=slow_judge, max_new_tokens=6, public_metrics=True)
    with ThreadServer(app) as srv:
        worker = threading.Thread(target=lambda: httpx.post(
            f"{srv.url}/v1/chat/completions", json={"model": "llava", "messages": [_image_message("hi")]}, timeout=60))
        worker.start()
        try:
            assert judging.wait(30)
            during = httpx.get(f"{srv.url}/metrics").text
        finally:
            release.set()
            worker.join(60)
        after = httpx.get(f"{srv.url}/metrics").text
    # while the judge runs, the request shows as being prepared (the queue and the batch are empty)
    assert _metric(during, "safecode_requests_preparing") == 1
    assert _metric(during, "safecode_requests_in_flight") == 1
    assert _metric(during, "safecode_queue_depth") == 0 and _metric(during, "safecode_active_rows") == 0
    assert _metric(after, "safecode_requests_preparing") == 0 and _metric(after, "safecode_requests_in_flight") == 0
    assert _metric(after, "safecode_judge_latency_seconds_count") == 1
    assert _metric(after, "safecode_judge_latency_seconds_sum") > 0
    assert _metric(after, "safecode_queue_wait_seconds_count") == 1
    assert _metric(after, "safecode_decode_tokens_per_second_count") == 1
    assert _metric(after, "safecode_batch_rows_count") >= 1
    assert 'safecode_engine_requests_total{outcome="answered"} 1.0' in after


class _OtlpSink:
    """An OTLP/HTTP receiver on 127.0.0.1 keeping every span batch it is sent."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                bodies.append((self.path, self.rfile.read(int(self.headers.get("content-length") or 0))))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for _, body in list(self.bodies):
            for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
                for scope in resource.scope_spans:
                    out.extend(scope.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_serve_otlp_endpoint_exports_the_span_tree_of_a_traced_request(tiny_model_dir, tmp_path, monkeypatch):
    from support.servers import ServerProcess

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms: export promptly
    sink = _OtlpSink()
    try:
        proc = ServerProcess.start(["--model", str(tiny_model_dir("llava")), "--judge", "fixed:unsafe",
                                    "--max-new-tokens", "4", "--otlp-endpoint", sink.url,
                                    "--audit-log", str(tmp_path / "audit.jsonl")])
        try:
            response = httpx.post(
                f"{proc.url}/v1/chat/completions", timeout=60,
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                json={"model": "llava", "messages": [_image_message(f"about {SECRET}")]},
            )
            assert response.status_code == 200
            spans = _wait_for(lambda: (s := sink.spans()) and {x.name for x in s} >= {"POST /v1/chat/completions", "chat llava"} and s)
        finally:
            assert proc.stop() == 0
    finally:
        sink.close()
    assert {path for path, _ in sink.bodies} == {"/v1/traces"}
    names = {s.name for s in spans}
    assert {"POST /v1/chat/completions", "chat llava", "safecode.judge", "safecode.window"} <= names
    # only the chat route is traced (FastAPI's own instrumentation, which would trace health checks
    # and record validation errors with the request's values, is off)
    assert not any(name.startswith("GET ") for name in names)
    assert {s.trace_id.hex() for s in spans} == {TRACE_ID}
    assert SECRET.encode() not in b"".join(body for _, body in sink.bodies)
    (line,) = _lines(tmp_path / "audit.jsonl")  # written by the time the server exits
    assert line["trace_id"] == TRACE_ID and line["request_id"] == response.json()["id"]


def test_otlp_configuration_from_the_flag_the_environment_or_not_at_all():
    script = """
import os, sys
from opentelemetry import trace
from safecode_guard.serving.observe import configure_otlp
assert configure_otlp(None) is False and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
try:
    configure_otlp("localhost:4318")
except SystemExit as exc:
    print("refused:", exc)
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["OTEL_SERVICE_NAME"] = "my-guard"
assert configure_otlp(None) is True
provider = trace.get_tracer_provider()
print(type(provider).__name__, provider.resource.attributes["service.name"])
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: --otlp-endpoint (='localhost:4318') must be an http(s) URL" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "TracerProvider my-guard"


def test_serve_flags_reach_the_settings():
    import argparse

    from safecode_guard.serve_cli import configure_parser, settings_from_args

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    settings = settings_from_args(parser.parse_args(["--audit-log", "-", "--audit-log-content"]))
    assert settings.audit_log == "-" and settings.audit_log_content is True
    assert settings_from_args(parser.parse_args([])).audit_log is None
