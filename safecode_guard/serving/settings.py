"""`ServerSettings`: everything `safecode-guard serve` (and the Ray Serve builder) is started with.

Validated at construction like the library's other settings. Clients can
change none of these; with `allow_request_settings` they may send a
`safecode` object with the method's knobs and a local judge (see `protocol`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from ..config import BatchingConfig, InputPolicy, SafeCoDeConfig

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerSettings"]

DEFAULT_MAX_BODY_BYTES = 64 * 2**20


class ServerSettings(BaseModel):
    """How one server (or one Ray Serve replica) loads its model and treats requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "demo"
    """Local folder (or hub id) of an image-text-to-text model; "demo" is the embedded demo model."""
    served_model_name: str | None = None
    """The name clients see in `/v1/models` and in responses; default: the model folder's name."""
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
    log_prompts: bool = False
    """Log each request's messages (off: one line per request without its text)."""

    @field_validator("policy")
    @classmethod
    def _no_local_files(cls, policy: InputPolicy) -> InputPolicy:
        # nothing a client sends is ever used as a path on this machine
        return policy.model_copy(update={"allow_local_files": False}) if policy.allow_local_files else policy

    @property
    def name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        from pathlib import PurePath

        return PurePath(self.model.rstrip("/\\")).name or "safecode"
