"""`ServerSettings`: everything `safecode-guard serve` (and the Ray Serve builder) is started with.

Validated at construction like the library's other settings. Clients can
change none of these; with `allow_request_settings` they may send a
`safecode` object with the method's knobs and a local judge (see `protocol`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ..config import BatchingConfig, InputPolicy, SafeCoDeConfig, validated_copy
from ..images.budget import DEFAULT_DECODE_BUDGET_MB, DEFAULT_DECODE_WAIT_S
from .body import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_JSON_ITEMS

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ConnectionLimits", "ServerSettings"]

DEFAULT_MAX_BODY_BYTES = 64 * 2**20


class ConnectionLimits(BaseModel):
    """What one connection may hold of `safecode-guard serve` (uvicorn; a Ray Serve proxy has its own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int | None = Field(1000, ge=1)
    """Open connections plus requests in flight before new requests get HTTP 503 (uvicorn's
    `limit_concurrency`); None: no cap. Keep it under the process's open-file limit."""
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    """Seconds a connection may take to send a request's line and headers (from connecting, or from
    the request's first byte on a kept-alive connection); then 408 and the connection closes."""
    keep_alive_s: int = Field(5, ge=1, le=600)
    """Seconds an idle kept-alive connection stays open (uvicorn's `timeout_keep_alive`)."""
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 2**20)
    """Largest request line plus headers; over it, 400 and the connection closes."""


class ServerSettings(BaseModel):
    """How one server (or one Ray Serve replica) loads its model and treats requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "demo"
    """Local folder (or hub id) of an image-text-to-text model; "demo" is the embedded demo model."""
    served_model_name: str | tuple[str, ...] | None = None
    """The name clients see in `/v1/models` and in responses; default: the model folder's name. Several
    names (as vLLM's `--served-model-name a b`): the first names responses, and a request's `model`
    may be any of them (another name is HTTP 404 `model_not_found`)."""
    judge: str = "self"
    """Judge spec: "self", "self:caption", "fixed:safe", "fixed:unsafe", "chat:<provider>:<model>"."""
    safecode: SafeCoDeConfig = Field(default_factory=SafeCoDeConfig)
    policy: InputPolicy = Field(default_factory=InputPolicy)
    """What requests may contain. Local files are never read for clients, whatever this says."""
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    max_new_tokens: int = Field(256, ge=1)
    """Answer length when a request sets neither `max_tokens` nor `max_completion_tokens`."""
    device: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] | None = None
    api_key: SecretStr | None = None
    """Bearer key every request must carry (`/health` excepted); None: no authentication."""
    public_metrics: bool = False
    """Serve `/metrics` without the API key (for a scraper inside a trusted network)."""
    allow_request_settings: bool = False
    """Let requests carry a `safecode` object (method knobs, a local judge, a verdict)."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the API; empty: no CORS headers at all."""
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    """Largest request body; bigger bodies get HTTP 413 before they are read."""
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Seconds a client may take to send the request body once its headers are in; then 408."""
    max_json_values: int = Field(DEFAULT_MAX_JSON_ITEMS, ge=100)
    """Most JSON values one body may hold (counted before it is parsed; HTTP 400 over it)."""
    max_json_depth: int = Field(DEFAULT_MAX_JSON_DEPTH, ge=4, le=900)
    """Deepest nesting of JSON objects and arrays in one body (HTTP 400 `nesting_too_deep` over it)."""
    decode_budget_mb: int | None = Field(DEFAULT_DECODE_BUDGET_MB, ge=16)
    """Image-decoding memory all requests may hold at once (`safecode_guard.images.budget`; process-wide);
    None: no budget."""
    decode_wait_s: float = Field(DEFAULT_DECODE_WAIT_S, ge=0, le=3600)
    """Longest an image decode waits for room in the budget before the request gets HTTP 429."""
    connections: ConnectionLimits = Field(default_factory=ConnectionLimits)
    """Connection limits of `safecode-guard serve` (uvicorn)."""
    docs: bool = False
    """Serve the OpenAPI schema and its pages (`/openapi.json`, `/docs`, `/redoc`), behind the API key
    when one is set. Off: those routes do not exist."""
    log_prompts: bool = False
    """Log each request's messages (off: one line per request without its text)."""
    audit_log: str | None = None
    """Audit log of every decision, one JSON line each (`safecode_guard.observability.AuditLog`): a file
    path (rotated at 100 MB, 10 kept) or "-" for stdout; None: no audit log."""
    audit_log_content: bool = False
    """Put each request's text parts in its audit line (off: only their SHA-256)."""

    @field_validator("policy")
    @classmethod
    def _no_local_files(cls, policy: InputPolicy) -> InputPolicy:
        # nothing a client sends is ever used as a path on this machine
        return validated_copy(policy, {"allow_local_files": False}) if policy.allow_local_files else policy

    @field_validator("served_model_name")
    @classmethod
    def _names(cls, names: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(names, tuple) and (not names or not all(names)):
            raise ValueError("`served_model_name` needs at least one name, and no empty one.")
        return names

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request's `model` may give; the first names the responses."""
        if isinstance(self.served_model_name, tuple):
            return self.served_model_name
        if self.served_model_name:
            return (self.served_model_name,)
        from pathlib import PurePath

        return (PurePath(self.model.rstrip("/\\")).name or "safecode",)

    @property
    def name(self) -> str:
        return self.names[0]
