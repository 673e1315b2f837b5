"""Ray Serve: the same OpenAI-compatible app on many replicas and machines.

    serve run safecode_guard.serving.ray_serve:app_builder model=/models/llava judge=self num_replicas=2

or `serve deploy` of a config file whose application has
`import_path: safecode_guard.serving.ray_serve:app_builder` and `args:` (see
`integrations/ray/`). Each replica is one `SafeCoDeServer` actor: it loads
the model once, in its constructor, and serves the FastAPI app of
`safecode_guard.serving.app` unchanged (routes, auth, errors, metrics, the
`safety` object), with the model's own scheduler batching the requests that
reach it. Ray Serve's proxy spreads requests over the replicas; every
response names the replica that answered in `X-SafeCoDe-Instance`.
Metrics: each replica copies its `/metrics` into Ray's metrics every 5 s
(`ray_metrics.RayMetricsBridge`), so Ray's metrics export on every node has
every replica's numbers with `replica` / `deployment` / `application` labels
(`ray_safecode_...`): one scrape for the application.

Health: a replica whose model failed to load never comes up (its constructor
raises, and Serve replaces it); `check_health` fails while the model is not
loaded or its scheduler thread has died, so Serve restarts it. A replica
killed mid-request fails its requests in flight with a 5xx from the proxy;
later requests go to the other replicas while Serve starts a new one.

`args` (strings from the command line, or YAML values): `model`, `judge`,
`served_model_name`, `api_key`, `num_replicas` or `autoscaling_config`,
`num_cpus`, `num_gpus`, `max_ongoing_requests`, `max_new_tokens`, `device`,
`dtype`, `public_metrics`, `allow_request_settings`, `audit_log` ("-" or a path with
`{replica}`), `audit_log_content`, every `SafeCoDeConfig`
field (`alpha=0.3`, ...) or a `safecode:` mapping, and `policy:` / `batching:`
mappings. Unknown keys are refused, naming the closest valid one.

Needs the optional extra: `pip install 'safecode-guard[serve,ray]'`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

try:
    from ray import serve
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        f"safecode_guard.serving.ray_serve needs Ray Serve ({exc}). Install it with "
        "`pip install 'safecode-guard[serve,ray]'`."
    ) from exc

from ..config import BatchingConfig, InputPolicy, SafeCoDeConfig, validated_copy
from ..errors import SafeCoDeInputError, did_you_mean
from .app import ModelHost, create_app
from .settings import ServerSettings

__all__ = [
    "RayServeArgs", "SafeCoDeServer", "app_builder", "check_replica_health", "replica_settings", "settings_from_args",
]


class RayServeArgs(BaseModel):
    """What `app_builder` takes: the server's settings plus Ray Serve's deployment options."""

    model_config = ConfigDict(extra="forbid")

    model: str = "demo"
    judge: str = "self"
    served_model_name: str | list[str] | None = None
    """The model's name (a list: the first names responses, all are accepted as a request's `model`)."""
    api_key: str | None = None
    """Bearer key. Better: leave it out and set `SAFECODE_API_KEY` in the replicas' environment
    (args are stored in the cluster's deployment config, visible to anyone who can read it)."""
    num_replicas: int | None = Field(None, ge=1)
    """Fixed replica count (default 1); not together with `autoscaling_config`."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve autoscaling, e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    """Requests one replica takes at once (its scheduler batches them); Ray's default of 5 would starve it."""
    max_new_tokens: int = Field(256, ge=1)
    device: str | None = None
    dtype: str | None = None
    public_metrics: bool = False
    allow_request_settings: bool = False
    audit_log: str | None = None
    """Audit log per replica: "-" (the replica's stdout, in Ray's logs) or a path, where `{replica}`
    becomes the replica's id (replicas on one node must not share a rotating file)."""
    audit_log_content: bool = False
    safecode: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(default_factory=dict)
    batching: dict[str, Any] = Field(default_factory=dict)

    @field_validator("autoscaling_config", "safecode", "policy", "batching", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        # `serve run ... batching='{"max_queue": 64}'` gives a string
        return json.loads(value) if isinstance(value, str) else value


def settings_from_args(args: dict[str, Any]) -> tuple[ServerSettings, RayServeArgs]:
    """The server settings and deployment options that `args` describe (typed errors for anything else)."""
    flat = dict(args)
    nested = dict(flat.pop("safecode", None) or {})
    if isinstance(nested, str):
        nested = json.loads(nested)
    for key in list(flat):
        if key in SafeCoDeConfig.model_fields:  # `alpha=0.3` on the command line
            nested[key] = flat.pop(key)
    unknown = [k for k in flat if k not in RayServeArgs.model_fields]
    if unknown:
        valid = sorted([*RayServeArgs.model_fields, *SafeCoDeConfig.model_fields])
        hints = []
        for key in unknown:
            close = did_you_mean(key, valid)
            hints.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
        raise SafeCoDeInputError(
            f"Unknown app_builder argument(s): {', '.join(hints)}. Valid: {valid}."
        )
    try:
        parsed = RayServeArgs.model_validate({**flat, "safecode": nested})
        if parsed.num_replicas is not None and parsed.autoscaling_config is not None:
            raise SafeCoDeInputError("Give `num_replicas` or `autoscaling_config`, not both.")
        key = parsed.api_key or None
        settings = ServerSettings(
            model=parsed.model,
            judge=parsed.judge,
            served_model_name=(
                tuple(parsed.served_model_name) if isinstance(parsed.served_model_name, list) else parsed.served_model_name
            ),
            safecode=SafeCoDeConfig(**parsed.safecode),
            policy=InputPolicy(**parsed.policy),
            batching=BatchingConfig(**parsed.batching),
            max_new_tokens=parsed.max_new_tokens,
            device=parsed.device,
            dtype=parsed.dtype,
            api_key=key,
            public_metrics=parsed.public_metrics,
            allow_request_settings=parsed.allow_request_settings,
            audit_log=parsed.audit_log,
            audit_log_content=parsed.audit_log_content,
        )
    except ValidationError as exc:
        raise SafeCoDeInputError(f"Invalid app_builder arguments: {exc}") from exc
    return settings, parsed


@serve.ingress()
class SafeCoDeServer:
    """One replica: the model loaded once, and the FastAPI app of `safecode_guard.serving.app`."""

    def __init__(self, settings_json: str) -> None:
        settings = replica_settings(settings_json, os.environ)
        self.host = ModelHost(settings)
        self.host.load()  # raises: the replica never comes up, and Serve replaces it
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (tests of the class itself)
            replica = "local"
        self.instance = f"{replica}@{os.getpid()}"
        if settings.audit_log is not None and "{replica}" in settings.audit_log:
            # a plain string field: no validation to skip
            settings = settings.model_copy(update={"audit_log": settings.audit_log.replace("{replica}", replica)})
        self._asgi = create_app(settings, host=self.host, load=False, instance_id=self.instance)
        # /metrics through the proxy is one replica's; Ray's metrics export carries every replica's
        from .ray_metrics import RayMetricsBridge

        self._metrics = RayMetricsBridge(self._asgi.state.metrics.registry).start()

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi

    def check_health(self) -> None:
        """Serve calls this periodically: an unhealthy replica is replaced."""
        check_replica_health(self.host)


def replica_settings(settings_json: str, environ: Mapping[str, str]) -> ServerSettings:
    """A replica's settings: those `app_builder` bound, with the key from `SAFECODE_API_KEY` when none was given.

    Validated like every other path that builds settings (the key becomes a
    `SecretStr`; `model_copy(update=...)` would leave it a `str`, and every
    request carrying a Bearer token would fail with HTTP 500)."""
    settings = ServerSettings.model_validate_json(settings_json)
    if settings.api_key is None and (key := environ.get("SAFECODE_API_KEY")):
        settings = validated_copy(settings, {"api_key": key})
    return settings


def check_replica_health(host: Any) -> None:
    """Raise when a replica cannot answer: its model is not loaded, or its scheduler died with work pending."""
    if not host.ready:
        raise RuntimeError(f"the model is not loaded ({host.error or 'still loading'})")
    scheduler = host.engine.scheduler
    worker = scheduler._worker
    if (worker is None or not worker.is_alive()) and (scheduler.queue_depth or scheduler.active_rows):
        raise RuntimeError("the scheduler thread is gone while requests are pending")


def app_builder(args: dict[str, Any]) -> Any:
    """The Ray Serve application for `serve run` / `serve deploy` (see the module docstring)."""
    settings, parsed = settings_from_args(args)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": parsed.num_cpus, "num_gpus": parsed.num_gpus},
        "max_ongoing_requests": parsed.max_ongoing_requests,
        "health_check_period_s": 5,
    }
    if parsed.autoscaling_config is not None:
        options["autoscaling_config"] = parsed.autoscaling_config
    else:
        options["num_replicas"] = parsed.num_replicas or 1
    deployment = serve.deployment(SafeCoDeServer, name="SafeCoDeServer").options(**options)
    # the key travels in the settings (SecretStr is written out here on purpose: replicas need it)
    payload = settings.model_dump(mode="json")
    if settings.api_key is not None:
        payload["api_key"] = settings.api_key.get_secret_value()
    return deployment.bind(json.dumps(payload))
