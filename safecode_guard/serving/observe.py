"""The server's side of observability: one ASGI middleware, and the OTLP exporter `serve` configures.

`Observability` wraps `POST /v1/chat/completions`: it continues the client's
W3C trace (`traceparent` header) in a SERVER span, makes a `RequestScope`
current (the audit log, the API key's short hash, the metrics observer), and
counts the request in flight. The engine's spans and audit line find all of
it in the request's context; the handlers are unchanged but for one call
naming the completion id (`note_request_id`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..observability import tracing
from ..observability.audit import AuditLog, RequestScope, key_id, request_scope
from .metrics import Metrics

__all__ = ["Observability", "configure_otlp", "fastapi_telemetry_off"]

logger = logging.getLogger("safecode_guard.serving")

TRACED_ROUTE = "/v1/chat/completions"


class Observability:
    """ASGI middleware around the chat route: trace context, request scope, in-flight gauge."""

    def __init__(self, app: ASGIApp, metrics: Metrics, audit: AuditLog | None, keyed: bool) -> None:
        self.app, self.metrics, self.audit, self.keyed = app, metrics, audit, keyed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != TRACED_ROUTE or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        span = _server_span(headers)
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # only a key that this server checks identifies anyone (a wrong one never reaches the engine)
        token = headers.get("authorization", "").partition(" ")[2].strip() if self.keyed else None
        request = RequestScope(audit=self.audit, api_key_id=key_id(token), observers=[self.metrics.observe_request])
        self.metrics.in_flight.inc()
        try:
            with request_scope(request), tracing.use_span(span):
                await self.app(scope, receive, observed)
        finally:
            self.metrics.in_flight.dec()
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(tracing.otel_trace.Status(tracing.otel_trace.StatusCode.ERROR))
                span.end()


def fastapi_telemetry_off() -> dict[str, Any]:
    """`FastAPI(**...)` arguments that turn FastAPI's own OpenTelemetry instrumentation off (FastAPI
    versions with `telemetry=`; older ones have none to turn off).

    It would trace every route (health checks included) beside our SERVER span, and by default
    records validation failures with the request's values and exception messages: user text.
    Our middleware traces the chat route, with no user text.
    """
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


def _server_span(headers: dict[str, str]) -> Any:
    """The request's SERVER span, continuing the client's `traceparent` when it sent one; None when not traced."""
    if not tracing.tracing_available():
        return None
    from opentelemetry.propagate import extract

    span = tracing.start_span(f"POST {TRACED_ROUTE}", kind="SERVER", context=extract(headers))
    if span is not None:
        span.set_attributes({"http.request.method": "POST", "http.route": TRACED_ROUTE, "url.path": TRACED_ROUTE})
    return span


def configure_otlp(endpoint: str | None) -> bool:
    """Export spans over OTLP/HTTP: to `endpoint` (a collector's base URL, e.g. `http://localhost:4318`;
    `/v1/traces` is appended when the URL has no path), or, without one, where the standard
    `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables say. False (and
    nothing configured) when neither is given. `OTEL_SERVICE_NAME` names the service (default
    `safecode-guard`). Needs the `otel` extra."""
    if endpoint is None and not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                 or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise SystemExit(
            f"OTLP export needs OpenTelemetry's SDK and exporter ({exc.name} is missing): "
            "pip install 'safecode-guard[otel]'"
        ) from exc
    if endpoint is not None:
        from urllib.parse import urlsplit

        if urlsplit(endpoint).scheme not in ("http", "https"):
            raise SystemExit(f"--otlp-endpoint (={endpoint!r}) must be an http(s) URL, e.g. http://localhost:4318")
        if urlsplit(endpoint).path in ("", "/"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
    service = os.environ.get("OTEL_SERVICE_NAME") or "safecode-guard"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    logger.info("exporting traces over OTLP/HTTP to %s", endpoint or "the OTEL_EXPORTER_OTLP_* endpoint")
    return True
