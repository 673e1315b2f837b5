"""Observability: OpenTelemetry spans, the audit log of verdicts, and what the server's metrics read.

- `tracing`: spans for each request (judge, queue, prefill, SafeCoDe window,
  decode) with GenAI semantic-convention and `safecode.*` attributes; to the
  application's tracer provider, nothing when none is configured;
- `audit`: `AuditLog`, one JSON line per decision through Python logging,
  never the user's text unless asked for;
- `records`: `RequestRecord`, the bridge the engine calls at a request's start and end.

`opentelemetry-api` is optional (`pip install safecode-guard[otel]`); without
it tracing is off and the rest works.
"""

from __future__ import annotations

from .audit import (
    AUDIT_LOGGER,
    AuditLog,
    RequestScope,
    content_sha256,
    key_id,
    note_request_id,
    request_scope,
)
from .tracing import tracing_available, use_tracer_provider

__all__ = [
    "AUDIT_LOGGER",
    "AuditLog",
    "RequestScope",
    "content_sha256",
    "key_id",
    "note_request_id",
    "request_scope",
    "tracing_available",
    "use_tracer_provider",
]
