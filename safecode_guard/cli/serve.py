"""`safecode-guard serve`: the OpenAI-compatible HTTP server (see `safecode_guard.serving`).

    safecode-guard serve --model ./my-vlm --judge self --host 127.0.0.1 --port 8000 --api-key "$KEY"

Every SafeCoDe setting, generation default, input limit and batching limit is
a flag. The model loads once, in the background: `/health` answers at once,
`/ready` and the API once the model is in (the URL is printed then). SIGTERM
stops accepting, lets requests in flight finish (up to --shutdown-timeout),
and exits 0. This module only builds the parser; the server's packages load
when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from ..config import BatchingConfig, InputPolicy
from .args import add_safecode_arguments, config_from_args

__all__ = ["configure_parser", "run_command", "run_server", "settings_from_args"]

API_KEY_ENV = "SAFECODE_API_KEY"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="local model folder or hub id (default: the embedded demo model)")
    parser.add_argument(
        "--served-model-name", nargs="+", default=None,
        help="the model name clients see (default: the folder's name); more names are aliases a request's "
        "`model` may give (another name gets HTTP 404)",
    )
    parser.add_argument("--judge", default="self", help='judge spec: "self", "self:caption", "fixed:safe", "chat:<provider>:<model>", '
                        '"guard:<folder or hub id>" (Llama Guard 3 Vision / 4, ShieldGemma 2; options after "?", '
                        'e.g. "guard:meta-llama/Llama-Guard-4-12B?device=cuda:1") (default: self)')
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    net.add_argument("--port", type=int, default=8000)
    net.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; unset: no key)")
    net.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    net.add_argument("--allow-request-settings", action="store_true", help="let requests carry a `safecode` object (method knobs, local judge, verdict)")
    net.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN (repeatable; default: no CORS)")
    net.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MB (default: 64)")
    net.add_argument("--body-timeout", type=float, default=None, help="seconds to receive a request body, then 408 (default: 60)")
    net.add_argument("--max-json-values", type=int, default=None, help="JSON values in one request body, counted before parsing (default: 100000)")
    net.add_argument("--max-json-depth", type=int, default=None, help="nesting of one request body (default: 64)")
    net.add_argument("--docs", action="store_true", help="serve /openapi.json, /docs and /redoc (behind the API key; default: off)")
    con = parser.add_argument_group("connections (uvicorn)")
    con.add_argument("--max-connections", type=int, default=None, help="open connections plus requests in flight before new requests get 503 (default: 1000; 0: no cap)")
    con.add_argument("--header-timeout", type=float, default=None, help="seconds a client may take to send a request's headers, then 408 and close (default: 10)")
    con.add_argument("--keep-alive", type=int, default=None, help="seconds an idle kept-alive connection stays open (default: 5)")
    con.add_argument("--max-header-kb", type=int, default=None, help="largest request line plus headers in KB (default: 64)")
    net.add_argument("--log-prompts", action="store_true", help="log each request's messages (default: off)")
    obs = parser.add_argument_group("observability")
    obs.add_argument("--audit-log", default=None, metavar="PATH|-", help="one JSON line per decision to PATH (rotated at 100 MB) or - for stdout; no user text (default: off)")
    obs.add_argument("--audit-log-content", action="store_true", help="put each request's text parts in its audit line (default: only a SHA-256)")
    obs.add_argument("--otlp-endpoint", default=None, metavar="URL", help="export OpenTelemetry traces over OTLP/HTTP to URL, e.g. http://localhost:4318 (default: the OTEL_EXPORTER_OTLP_* variables; unset: off)")
    net.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds requests in flight may take after SIGTERM (default: 30)")
    net.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    gen = parser.add_argument_group("generation defaults")
    gen.add_argument("--max-new-tokens", type=int, default=256, help="answer length when a request sets none (default: 256)")
    gen.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--dtype", default=None, choices=("auto", "float32", "float16", "bfloat16"))
    lim = parser.add_argument_group("input limits (InputPolicy)")
    lim.add_argument("--max-messages", type=int, default=None, help="messages per request, counted before any is read (1024)")
    lim.add_argument("--max-content-parts", type=int, default=None, help="text and image parts per request, in all (4096)")
    lim.add_argument("--max-images", type=int, default=None, help="images per request (8)")
    lim.add_argument("--max-image-bytes", type=int, default=None, help="encoded bytes per image (25000000)")
    lim.add_argument("--max-image-pixels", type=int, default=None, help="pixels per image (40000000)")
    lim.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt tokens (default: the model's context)")
    lim.add_argument("--max-new-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask (8192)")
    lim.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (public hosts only; off by default)")
    lim.add_argument("--url-timeout", type=float, default=None, help="seconds per image download (10)")
    lim.add_argument("--decode-budget-mb", type=int, default=None, help="image-decoding memory all requests may hold at once, process-wide (2048; 0: no budget)")
    lim.add_argument("--decode-wait", type=float, default=None, help="seconds an image decode waits for room in that budget, then 429 (10)")
    bat = parser.add_argument_group("batching (BatchingConfig)")
    bat.add_argument("--max-batch-rows", type=int, default=None, help="rows per decode step (32)")
    bat.add_argument("--max-queue", type=int, default=None, help="waiting requests before HTTP 429 (1024)")
    bat.add_argument("--kv-cache-budget-mb", type=float, default=None, help="KV-cache memory the batch may plan for (no limit)")
    bat.add_argument("--request-timeout", type=float, default=None, help="seconds per request from its body to its last token: parsing, images, judge, queue and decoding (no limit)")
    bat.add_argument("--no-batching", action="store_true", help="one request at a time (debugging)")
    add_safecode_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> object:
    """The `ServerSettings` the flags describe (validation errors name the field)."""
    from pydantic import SecretStr

    # heavy (torch / the server stack): loaded when the command runs, so the parser stays fast
    from ..serving.settings import ConnectionLimits, ServerSettings

    def given(mapping: dict[str, str]) -> dict[str, object]:
        return {field: getattr(args, flag) for flag, field in mapping.items() if getattr(args, flag) is not None}

    policy = given({
        "max_messages": "max_messages", "max_content_parts": "max_content_parts",
        "max_images": "max_images", "max_image_bytes": "max_image_bytes", "max_image_pixels": "max_image_pixels",
        "max_prompt_tokens": "max_prompt_tokens", "max_new_tokens_limit": "max_new_tokens_limit",
        "url_timeout": "url_timeout_s",
    })
    if args.allow_image_urls:
        policy["allow_image_urls"] = True
    batching = given({
        "max_batch_rows": "max_batch_rows", "max_queue": "max_queue", "kv_cache_budget_mb": "kv_cache_budget_mb",
        "request_timeout": "request_timeout_s",
    })
    if args.no_batching:
        batching["enabled"] = False
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    connections: dict[str, object] = given({
        "header_timeout": "header_timeout_s", "keep_alive": "keep_alive_s",
    })
    if args.max_connections is not None:
        connections["max_connections"] = args.max_connections or None
    if args.max_header_kb is not None:
        connections["max_header_bytes"] = args.max_header_kb * 1024
    server = given({
        "body_timeout": "body_timeout_s", "max_json_values": "max_json_values", "max_json_depth": "max_json_depth",
        "decode_wait": "decode_wait_s",
    })
    if args.decode_budget_mb is not None:
        server["decode_budget_mb"] = args.decode_budget_mb or None
    return ServerSettings(
        **server,
        connections=ConnectionLimits(**connections),
        docs=args.docs,
        model=args.model,
        served_model_name=_one_or_tuple(args.served_model_name),
        judge=args.judge,
        safecode=config_from_args(args),
        policy=InputPolicy(**policy),
        batching=BatchingConfig(**batching),
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=args.dtype,
        api_key=SecretStr(key) if key else None,
        public_metrics=args.public_metrics,
        allow_request_settings=args.allow_request_settings,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=int(args.max_body_mb * 2**20),
        log_prompts=args.log_prompts,
        audit_log=args.audit_log,
        audit_log_content=args.audit_log_content,
    )


def run_command(args: argparse.Namespace) -> int:
    import logging

    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # heavy (torch / the server stack): loaded when the command runs, so the parser stays fast
        from ..serving import create_app
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # OpenTelemetry's SDK and exporter load only when traces are exported (the `otel` extra)
    from ..serving.observe import configure_otlp

    configure_otlp(args.otlp_endpoint)
    url = f"http://{args.host}:{args.port}"

    def ready() -> None:
        auth = " (API key required)" if settings.api_key is not None else ""
        print(f"safecode-guard: serving {settings.name} at {url}/v1{auth}", flush=True)

    app = create_app(settings, on_ready=ready)
    print(f"safecode-guard: loading {settings.model} ... (/health answers now, /ready once loaded)", file=sys.stderr, flush=True)
    run_server(
        app, host=args.host, port=args.port, log_level=args.log_level, shutdown_timeout=args.shutdown_timeout,
        limits=settings.connections,
    )
    return 0


def run_server(
    app: object, *, host: str, port: int, log_level: str = "info", shutdown_timeout: float = 30.0,
    limits: object = None,
) -> None:
    """Serve `app` with uvicorn until SIGTERM or Ctrl-C; a SIGTERM shutdown returns normally (exit 0).

    uvicorn stops accepting, lets requests in flight finish (up to
    `shutdown_timeout`), then re-raises the signal it caught with the handler
    that was there before it; a no-op handler makes that a clean return.
    `limits` (a `ConnectionLimits`, default its defaults) bounds connections:
    a header-read timeout, idle keep-alive, the header size, and connections
    in all (`serving.http_limits`); the open-file limit is raised to its hard
    maximum so that the connection cap, not the file table, is what refuses.
    """
    import signal

    import uvicorn

    # heavy (torch / the server stack): loaded when the command runs, so the parser stays fast
    from ..serving.http_limits import uvicorn_limits

    # heavy (torch / the server stack): loaded when the command runs, so the parser stays fast
    from ..serving.settings import ConnectionLimits

    _raise_open_file_limit()
    _return_large_blocks_to_the_os()
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=shutdown_timeout, lifespan="on",
        **uvicorn_limits(limits if limits is not None else ConnectionLimits()),
    )
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit to the hard one (each connection is a file)."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):  # not allowed here: keep the soft limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


MMAP_THRESHOLD = 4 * 2**20
"""Allocations at least this large get pages of their own (glibc `M_MMAP_THRESHOLD`)."""


def _return_large_blocks_to_the_os() -> None:
    """Make glibc give every allocation of `MMAP_THRESHOLD` or more back to the OS when it is freed.

    By default glibc raises its mmap threshold each time a large block is freed
    (up to 32 MB), so the buffers of big image decodes in many threads end up in
    malloc arenas that are never trimmed: a server's RSS grew by 280 MB over a
    load test with big images and stayed there. A fixed threshold keeps it flat.
    No effect off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return
    if mallopt is not None:
        m_mmap_threshold = -3  # from <malloc.h>
        mallopt(m_mmap_threshold, MMAP_THRESHOLD)


def _one_or_tuple(names: list[str] | None) -> str | tuple[str, ...] | None:
    return None if not names else names[0] if len(names) == 1 else tuple(names)
