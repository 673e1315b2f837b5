"""The OpenAI-compatible HTTP server: a FastAPI app around one `ChatSafeCoDe`.

Routes: `POST /v1/chat/completions` (JSON or server-sent events),
`GET /v1/models`, `GET /health` (alive), `GET /ready` (model loaded),
`GET /metrics` (Prometheus text).

Request flow: body size cap (413) -> API key (401) -> the body, within
`body_timeout_s` (408) -> in a preparation thread: JSON within a structure
budget (400), the schema (422), the message and part counts
(`InputPolicy.max_messages`, `max_content_parts`; 400) and OpenAI messages to
LangChain -> the served `ChatSafeCoDe`, whose engine's scheduler batches this
request with every other one on the model -> OpenAI's response shape plus a
top-level `safety` object (and the `X-SafeCoDe-Verdict` header; a guard
judge's hazard `categories` in it). With `check_answer`, a non-streamed answer
the judge finds unsafe is replaced by the refusal, and a stream's last event
flags it (`safety.answer_check`: its text was sent already). A stream's
first event waits for the verdict and the first text, so errors found before
any token (bad input, a full queue) are ordinary HTTP errors.

Every request runs under one `RequestControl`: its deadline
(`--request-timeout`, 504) covers parsing, image decoding, the judge,
queueing and decoding, and from the moment its body is read the connection
is watched, so a client that goes away (streaming or not) cancels its
request wherever it is: preparation, the judge, its queue place, its prefill
or its decoding.

Every failure becomes OpenAI's error body in one place (`error_response`),
with no stack trace and no local path; a failed judge's reason is a fixed
code (`judge_error`, `judge_timeout`, `judge_busy`, `judge_unparseable`, `judge_truncated`),
its details go to the server log. The engine never sees HTTP.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import reprlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..control import RequestControl, arun_briefly, use_control
from ..engine import demo_model
from ..engine.core import SafeCoDe
from ..errors import (
    APIError,
    JSONBudgetError,
    JudgeError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    SafeCoDeInputError,
)
from ..images.budget import set_decode_memory_budget
from ..judges import judge_error_code
from ..langchain.chat_model import ChatSafeCoDe
from ..langchain.chunks import replace_unsafe_answer
from ..observability.audit import AuditLog, note_request_id
from ..openai_messages import to_langchain, tool_calls_out
from ..prompting import check_counts
from .body import parse_json_body
from .metrics import Metrics
from .observe import Observability, fastapi_telemetry_off
from .protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    SafeCoDeRequestSettings,
    Usage,
    completion_id,
)
from .settings import ServerSettings

__all__ = ["ModelHost", "create_app", "error_response"]

logger = logging.getLogger("safecode_guard.serving")

VERDICT_HEADER = "X-SafeCoDe-Verdict"
_VARIANTS = 16  # per-request settings variants kept loaded (they share the model)


# --------------------------------------------------------------------------- the model


class ModelHost:
    """Loads the served model once and hands out the `ChatSafeCoDe`s that answer requests.

    `load()` blocks (a CLI runs it in the background; a Ray replica in its
    constructor, so a failed load marks the replica unhealthy). Variants with
    per-request SafeCoDe settings share the loaded weights and scheduler.
    """

    def __init__(self, settings: ServerSettings, *, judge: Any = None) -> None:
        self.settings = settings
        self.judge = judge if judge is not None else settings.judge
        self.chat: Any = None
        self.error: str | None = None
        self._variants: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loaded = threading.Event()

    @property
    def ready(self) -> bool:
        return self.chat is not None

    def load(self) -> None:
        s = self.settings
        try:
            path = s.model
            if path == "demo":
                path = str(demo_model.ensure_demo_model())
            engine = SafeCoDe.from_pretrained(
                path, config=s.safecode, judge=self.judge, policy=s.policy, device=s.device, dtype=s.dtype,
                batching=s.batching,
            )
            self.chat = ChatSafeCoDe.from_model(
                engine.model, engine.processor, model_name=s.name, judge=self.judge, safecode=s.safecode,
                policy=s.policy, max_new_tokens=s.max_new_tokens,
            )
        except Exception as exc:
            # kept for /ready and the logs; clients only ever see "not ready"
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._loaded.set()

    def chat_for(self, extra: SafeCoDeRequestSettings | None) -> Any:
        """The chat model for a request: the served one, or a variant with the request's settings."""
        if extra is None or (extra.judge is None and not extra.config_updates()):
            return self.chat
        config = self.settings.safecode.model_copy(update=extra.config_updates())
        config = type(config).model_validate(config.model_dump())  # validate the client's values
        judge = extra.judge or self.judge
        key = json.dumps([config.model_dump(mode="json"), judge if isinstance(judge, str) else id(judge)])
        with self._lock:
            chat = self._variants.get(key)
            if chat is None:
                engine = self.chat.engine
                chat = ChatSafeCoDe.from_model(
                    engine.model, engine.processor, model_name=self.settings.name, judge=judge, safecode=config,
                    policy=self.settings.policy, max_new_tokens=self.settings.max_new_tokens,
                )
                self._variants[key] = chat
                while len(self._variants) > _VARIANTS:
                    self._variants.popitem(last=False)
            else:
                self._variants.move_to_end(key)
            return chat


# --------------------------------------------------------------------------- errors


def error_response(exc: BaseException) -> JSONResponse:
    """Every failure as OpenAI's error body with its status: the one place errors are mapped.

    Messages go through `public_text` (no local path, no home folder); a judge's
    failure is a fixed code, its details logged here, never sent.
    """
    if isinstance(exc, APIError):
        status, message, type_, param, code, headers = exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers
    elif isinstance(exc, OverloadedError):
        status, message, type_, param, code, headers = 429, str(exc), "rate_limit_error", None, "overloaded", {"Retry-After": "1"}
    elif isinstance(exc, RequestTimeoutError):
        status, message, type_, param, code, headers = 504, str(exc), "timeout_error", None, "request_timeout", {}
    elif isinstance(exc, (RequestCancelledError, ClientDisconnect)):
        # nobody reads this (nginx's "client closed request"); it is what the log and the metrics say
        status, message, type_, param, code, headers = 499, "The client closed the request.", "invalid_request_error", None, "client_closed_request", {}
    elif isinstance(exc, JudgeError):
        cause = exc.__cause__
        code = judge_error_code(f"{type(cause).__name__}: " if cause is not None else "JudgeError: ")
        logger.warning("the judge failed and on_judge_error='raise' fails the request: %s", exc)
        status, type_, param, headers = 502, "judge_error", None, {}
        message = f"The safety judge failed ({code}), and this server fails the request when it does. Retry later."
    elif isinstance(exc, JSONBudgetError):
        status, message, type_, param, code, headers = 400, str(exc), "invalid_request_error", None, exc.code, {}
    elif isinstance(exc, SafeCoDeInputError):  # every bad-input error of the library
        code = _snake(type(exc).__name__.removesuffix("Error"))
        status, message, type_, param, headers = 400, str(exc), "invalid_request_error", None, {}
    elif isinstance(exc, RecursionError):  # a walk over a deeply nested request (json, pydantic, repr)
        return error_response(_too_deep())
    elif isinstance(exc, ValidationError):
        status, type_, code, headers = 422, "invalid_request_error", "invalid_schema", {}
        message, param = _validation_message(exc)
    else:
        logger.exception("internal error", exc_info=exc)
        status, message, type_, param, code, headers = 500, "The server failed to answer this request.", "server_error", None, "internal_error", {}
    body = ErrorResponse(error=ErrorBody(message=public_text(message), type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# Absolute local paths (POSIX and Windows) in a message: what a client must never learn.
_LOCAL_PATH = re.compile(r"(?<![\w:/.])(?:/(?:[\w.@+-]+/)+[\w.@+-]*|[A-Za-z]:\\(?:[^\\\s]+\\)+[^\\\s]*)")


def public_text(message: str) -> str:
    """`message` fit for a client: local paths and the home folder replaced by `<path>`.

    Library messages name the problem and the fix; some quote a third-party
    error (a chat template's, a decoder's) that may name a file on this machine.
    """
    message = _LOCAL_PATH.sub("<path>", message)
    home = os.path.expanduser("~")
    return message.replace(home, "<path>") if len(home) > 1 else message


def public_safety(safety: dict[str, Any]) -> dict[str, Any]:
    """The `safety` object for a client: a failed judge's `error` becomes its fixed code (the text is logged),
    that of a failed answer check (`answer_check.error`) too."""
    check = safety.get("answer_check")
    if isinstance(check, dict) and check.get("error") is not None:
        logger.warning("answer check by %s failed: %s", check.get("judge"), check.get("error"))
        safety = {**safety, "answer_check": {**check, "error": judge_error_code(str(check["error"]))}}
    error = safety.get("error")
    if error is None:
        return safety
    logger.warning("judge %s failed (%s verdict, source %s): %s", safety.get("judge"), safety.get("verdict"),
                   safety.get("source"), error)
    return {**safety, "error": judge_error_code(str(error))}


# What `--log-prompts` writes of a request: bounded in length and depth (a deep body must not
# make the log line recurse).
_PROMPT_REPR = reprlib.Repr()
_PROMPT_REPR.maxlevel, _PROMPT_REPR.maxstring, _PROMPT_REPR.maxother = 8, 2000, 200
_PROMPT_REPR.maxlist = _PROMPT_REPR.maxdict = 50


def _too_deep() -> APIError:
    return APIError(
        400,
        "The request is nested too deeply to read. Flatten it (tool arguments and schemas rarely "
        "need more than a few levels).",
        "invalid_request_error",
        code="nesting_too_deep",
    )


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"Unrecognized request argument supplied: {where}")
        else:
            problems.append(f"{where}: {err['msg']}")
    first = exc.errors()[0]["loc"] if exc.errors() else ()
    return "; ".join(problems), (".".join(str(p) for p in first) or None)


# --------------------------------------------------------------------------- body size


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (HTTP 413), from the header or while reading."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        too_big = APIError(
            413, f"The request body is larger than this server's limit of {self.limit} bytes. Send smaller images "
            "or fewer of them.", "invalid_request_error", code="request_too_large",
        )
        # bytes.isdigit() is ASCII-only; a length of more than 18 digits is over any limit (and int() of
        # thousands of digits raises)
        if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > self.limit):
            await error_response(too_big)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_big
            return message

        try:
            await self.app(scope, counted, send)
        except APIError as exc:
            if exc is not too_big:
                raise
            await error_response(exc)(scope, receive, send)


class InstanceHeader:
    """ASGI middleware: name the server instance that answered in `X-SafeCoDe-Instance`."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app, self.value = app, value.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-safecode-instance", self.value)]
            await send(message)

        await self.app(scope, receive, named)


# --------------------------------------------------------------------------- the service


class ChatCompletions:
    """`POST /v1/chat/completions`: protocol objects in, engine calls, protocol objects out."""

    def __init__(self, host: ModelHost, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics

    def _options(self, req: ChatCompletionRequest) -> dict[str, Any]:
        s = self.host.settings
        options: dict[str, Any] = {"max_new_tokens": req.token_limit or s.max_new_tokens}
        simple = {
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
            "frequency_penalty": req.frequency_penalty, "presence_penalty": req.presence_penalty,
            "logit_bias": req.logit_bias, "response_format": req.response_format,
        }
        options.update({k: v for k, v in simple.items() if v is not None})
        if req.stop is not None:
            options["stop"] = [req.stop] if isinstance(req.stop, str) else req.stop
        if req.tools:
            options["tools"] = req.tools
            if req.tool_choice is not None:
                options["tool_choice"] = req.tool_choice
            if req.parallel_tool_calls is not None:
                options["parallel_tool_calls"] = req.parallel_tool_calls
        elif req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice was given without tools.", "invalid_request_error", param="tool_choice")
        if req.safecode is not None and req.safecode.verdict is not None:
            options["verdict"] = req.safecode.verdict
        return options

    def read(self, body: bytes) -> tuple[Any, ChatCompletionRequest, list[Any]]:
        """The body as (payload, request, LangChain messages), every limit checked before the next step.

        Runs in a preparation thread (never on the event loop): the JSON
        structure budget before parsing, the schema, then the message and part
        counts before any message is converted.
        """
        s = self.host.settings
        payload = parse_json_body(body, max_items=s.max_json_values, max_depth=s.max_json_depth)
        if not isinstance(payload, dict):
            raise APIError(400, "The request body must be a JSON object.", "invalid_request_error", code="invalid_json")
        req = ChatCompletionRequest.model_validate(payload)
        check_counts(req.messages, s.policy)
        return payload, req, to_langchain(req.messages)

    async def create(
        self, req: ChatCompletionRequest, messages: list[Any], started: float, watcher: asyncio.Task[None] | None = None
    ) -> Response:
        """The answer; a streamed one takes over `watcher` (the client's connection) until it ends."""
        if req.n != 1:
            raise APIError(
                400, f"n={req.n} is not supported: this server returns one choice per request. Send n=1 "
                "(or leave it out) and repeat the request for more answers.", "invalid_request_error", param="n",
            )
        if req.safecode is not None and not self.host.settings.allow_request_settings:
            raise APIError(
                400, "Per-request SafeCoDe settings are off on this server; the judge, threshold and image policy "
                "are the server's. Remove the `safecode` field, or start the server with --allow-request-settings.",
                "invalid_request_error", param="safecode", code="request_settings_disabled",
            )
        chat = self.host.chat_for(req.safecode)
        options = self._options(req)
        stop = options.pop("stop", None)
        chunks = chat.astream(messages, stop=stop, **options).__aiter__()
        try:
            first = await chunks.__anext__()  # the verdict, and errors found before any token
        except BaseException:
            await chunks.aclose()
            raise
        ttft = time.perf_counter() - started
        safety = dict(first.response_metadata.get("safety") or {})
        headers = {VERDICT_HEADER: str(safety.get("verdict"))}
        cid = completion_id()
        note_request_id(cid)  # the audit line and the trace name the id the client gets
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self._events(cid, first, chunks, safety, include_usage, started, ttft, watcher)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        message = first
        try:
            async for chunk in chunks:
                message = message + chunk
        finally:
            await chunks.aclose()
        # not shown yet: an answer the answer check found unsafe is replaced by the refusal
        from langchain_core.messages import message_chunk_to_message

        message = replace_unsafe_answer(message_chunk_to_message(message), chat.safecode.answer_refusal)
        return JSONResponse(self._completion(cid, message, safety, started, ttft).model_dump(exclude_none=False), headers=headers)

    def _completion(self, cid: str, message: Any, safety: dict[str, Any], started: float, ttft: float) -> ChatCompletion:
        meta = message.response_metadata
        safety = {**safety, **(meta.get("safety") or {})}
        calls = tool_calls_out(message)
        usage = message.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        finish = "tool_calls" if calls else meta.get("finish_reason", "stop")
        self._finished(safety, usage, started, ttft)
        return ChatCompletion(
            id=cid,
            model=self.host.settings.name,
            choices=[Choice(message=ChatMessage(content=message.text or (None if calls else ""), tool_calls=calls or None), finish_reason=finish)],
            usage=Usage(prompt_tokens=usage["input_tokens"], completion_tokens=usage["output_tokens"], total_tokens=usage["total_tokens"]),
            safety=public_safety(safety),
        )

    def _finished(self, safety: dict[str, Any], usage: Any, started: float, ttft: float) -> None:
        self.metrics.record_answer(safety, usage["input_tokens"], usage["output_tokens"])
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.ttft.observe(ttft)

    async def _events(
        self, cid: str, first: Any, chunks: AsyncIterator[Any], safety: dict[str, Any], include_usage: bool,
        started: float, ttft: float, watcher: asyncio.Task[None] | None = None,
    ) -> AsyncIterator[str]:
        name = self.host.settings.name
        index_of: dict[int, int] = {}
        shown = public_safety(safety)

        def delta_for(chunk: Any, first_event: bool) -> ChatCompletionChunk:
            calls = []
            for c in chunk.tool_call_chunks:
                i = index_of.setdefault(c.get("index") or 0, len(index_of))
                calls.append(DeltaToolCall(index=i, id=c.get("id"), type="function",
                                           function=DeltaFunction(name=c.get("name"), arguments=c.get("args") or "")))
            delta = Delta(role="assistant" if first_event else None, content=chunk.text if (chunk.text or first_event) else None,
                          tool_calls=calls or None)
            return ChatCompletionChunk(id=cid, model=name, choices=[ChunkChoice(delta=delta)], safety=shown if first_event else None)

        total = first
        finished = False
        try:
            yield delta_for(first, True).sse()
            async for chunk in chunks:
                total = total + chunk
                if chunk.text or chunk.tool_call_chunks:
                    yield delta_for(chunk, False).sse()
            meta = total.response_metadata
            late = meta.get("safety") or {}
            blocked = late.get("blocked_tool_calls")
            finish = "tool_calls" if (total.tool_calls or total.invalid_tool_calls) else meta.get("finish_reason", "stop")
            last = ChatCompletionChunk(id=cid, model=name, choices=[ChunkChoice(delta=Delta(), finish_reason=finish)])
            if blocked:
                last.safety = {"blocked_tool_calls": blocked}
            if late.get("answer_check") is not None:
                # the answer was streamed already: the last event flags what the answer check found
                last.safety = public_safety({**(last.safety or {}), "answer_check": late["answer_check"]})
            yield last.sse()
            usage = total.usage_metadata or {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
            if include_usage:
                yield ChatCompletionChunk(
                    id=cid, model=name, choices=[],
                    usage=Usage(prompt_tokens=usage["input_tokens"], completion_tokens=usage["output_tokens"], total_tokens=usage["total_tokens"]),
                ).sse()
            yield "data: [DONE]\n\n"
            finished = True
            self._finished({**safety, **(meta.get("safety") or {})}, usage, started, ttft)
        except Exception as exc:  # an error after the first event: OpenAI's error object as an event
            body = json.loads(error_response(exc).body)
            yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if watcher is not None:
                watcher.cancel()
            # a client that went away (or an error) stops decoding: its row leaves the batch
            await chunks.aclose()  # type: ignore[attr-defined]
            if not finished:
                logger.info("stream ended early (client gone or error); decoding cancelled")


# --------------------------------------------------------------------------- the app


def create_app(
    settings: ServerSettings | None = None,
    *,
    host: ModelHost | None = None,
    judge: Any = None,
    load: bool = True,
    on_ready: Callable[[], None] | None = None,
    instance_id: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `settings.model` (or the given `host`).

    With `load=True` the model loads in a background thread at startup; until
    then `/ready` and the API answer 503. `judge` (a judge object) overrides
    `settings.judge` for Python embeddings. Pass `load=False` and call
    `host.load()` yourself to load before serving (Ray Serve replicas do).
    `on_ready` is called once the model is loaded (the CLI prints the URL).
    `instance_id` names this server in an `X-SafeCoDe-Instance` header on
    every response (Ray Serve replicas set it, so a client sees which answered).
    """
    settings = settings or (host.settings if host is not None else ServerSettings())
    host = host or ModelHost(settings, judge=judge)
    metrics = Metrics()
    service = ChatCompletions(host, metrics)
    audit = AuditLog(settings.audit_log, content=settings.audit_log_content) if settings.audit_log else None
    if audit is not None:
        metrics.watch_audit(audit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if load and not host.ready:
            loader = asyncio.create_task(arun_briefly(lambda: _load_and_log(host, metrics, on_ready)))
        yield
        if loader is not None and not loader.done():
            loader.cancel()
        if audit is not None:
            audit.close()  # the lines still queued are written

    # The schema pages are off unless asked for, and then behind the key like the API (below).
    app = FastAPI(title="safecode-guard", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, **fastapi_telemetry_off())
    app.state.host = host
    app.state.metrics = metrics
    app.state.audit = audit
    set_decode_memory_budget(settings.decode_budget_mb, settings.decode_wait_s)  # process-wide
    if host.ready:
        _watch(host, metrics)

    def check_key(request: Request) -> None:
        key = settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.get_secret_value().encode()):
            raise APIError(
                401, "Missing or wrong API key. Send the header `Authorization: Bearer <key>`.",
                "invalid_request_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )

    def check_ready() -> None:
        if not host.ready:
            raise APIError(503, "The model is still loading (or failed to load); retry shortly.", "server_error",
                           code="model_not_ready", headers={"Retry-After": "5"})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"No route {request.method} {request.url.path}." if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(APIError(exc.status_code, message, type_, code=_snake(type_.removesuffix("_error"))))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        status, verdict, payload = 500, None, None
        # One control for the whole request: its deadline covers everything from here on, and the
        # engine calls below pick it up from the context (their own controls are its children).
        limit = settings.batching.request_timeout_s
        control = RequestControl(limit, source=f"--request-timeout={limit:g}" if limit is not None else "timeout_s")
        watcher: asyncio.Task[None] | None = None
        streamed = False
        try:
            with use_control(control):
                check_key(request)
                check_ready()
                body = await _read_body(request, settings.body_timeout_s)
                watcher = asyncio.create_task(_watch_disconnect(request, control))
                payload, req, messages = await arun_briefly(lambda: service.read(body))
                response = await service.create(req, messages, started, watcher)
            streamed = isinstance(response, StreamingResponse)
            status, verdict = response.status_code, response.headers.get(VERDICT_HEADER)
            return response
        except Exception as exc:
            if control.cancelled and not isinstance(exc, (RequestCancelledError, ClientDisconnect)):
                exc = RequestCancelledError("The client went away.")  # whatever the cancellation interrupted
            response = error_response(exc)
            status = response.status_code
            return response
        finally:
            if watcher is not None and not streamed:
                watcher.cancel()
            metrics.requests.labels(status=str(status)).inc()
            logger.info(
                "POST /v1/chat/completions %s %.3fs verdict=%s%s", status, time.perf_counter() - started, verdict,
                f" messages={_PROMPT_REPR.repr(payload)}" if settings.log_prompts and payload is not None else "",
            )

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse(ModelList(data=[ModelCard(id=settings.name)]).model_dump())

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if host.ready:
            return JSONResponse({"status": "ready", "model": settings.name})
        return error_response(APIError(503, "The model is not loaded yet." if host.error is None else "The model failed to load; see the server log.",
                                       "server_error", code="model_not_ready", headers={"Retry-After": "5"}))

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if not settings.public_metrics:
            check_key(request)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if settings.docs:
        from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_schema(request: Request) -> Response:
            check_key(request)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs_page(request: Request) -> Response:
            check_key(request)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="safecode-guard")

        @app.get("/redoc", include_in_schema=False)
        async def redoc_page(request: Request) -> Response:
            check_key(request)
            return get_redoc_html(openapi_url="/openapi.json", title="safecode-guard")

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=[VERDICT_HEADER])
    app.add_middleware(Observability, metrics=metrics, audit=audit, keyed=settings.api_key is not None)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    if instance_id is not None:
        app.add_middleware(InstanceHeader, value=instance_id)
    return app


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """The request body, within `timeout_s` (a client trickling its body gets 408)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await request.body()
    except TimeoutError as exc:
        raise APIError(
            408, f"The request body did not arrive within {timeout_s:g} s. Send it at once (or raise --body-timeout).",
            "invalid_request_error", code="body_timeout",
        ) from exc


async def _watch_disconnect(request: Request, control: RequestControl) -> None:
    """Cancel `control` when the client goes away (its body has been read, so the next message
    the server gets for this request is the disconnect)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not control.cancelled:
                    control.cancel()
                    logger.info("the client went away; its request is cancelled")
                return
    except Exception:  # the connection is already gone: nothing left to watch
        control.cancel()


def _load_and_log(host: ModelHost, metrics: Metrics, on_ready: Callable[[], None] | None) -> None:
    start = time.perf_counter()
    try:
        host.load()
    except Exception:
        logger.exception("the model failed to load")
        return
    _watch(host, metrics)
    logger.info("model %s loaded in %.1fs", host.settings.name, time.perf_counter() - start)
    if on_ready is not None:
        on_ready()


def _watch(host: ModelHost, metrics: Metrics) -> None:
    scheduler = host.chat.engine.scheduler
    metrics.watch_engine(scheduler)


def _version() -> str:
    return __version__

