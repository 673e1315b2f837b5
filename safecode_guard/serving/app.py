"""The OpenAI-compatible HTTP server: a FastAPI app around one loaded `SafeCoDe` engine.

Routes: `POST /v1/chat/completions` (JSON or server-sent events),
`GET /v1/models`, `GET /health` (alive), `GET /ready` (model loaded),
`GET /metrics` (Prometheus text).

Request flow: body size cap (413) -> API key (401) -> JSON content type (415)
-> the body, within `body_timeout_s` (408) -> in a preparation thread: JSON
within a structure budget (400), the schema (400, OpenAI's codes), the
`model` name (404), the message and part counts (`InputPolicy.max_messages`,
`max_content_parts`; 400) and OpenAI messages to Hugging Face messages ->
the decoding options as `SamplingParams` -> `calls.open_call` on the engine,
whose scheduler batches this request with every other one on the model ->
`calls` events -> OpenAI's response shape plus a top-level `safety` object
(and the `X-SafeCoDe-Verdict` header; a guard judge's hazard `categories` in
it). With `check_answer`, a non-streamed answer the judge finds unsafe is
replaced by the refusal, and a stream's last event flags it
(`safety.answer_check`: its text was sent already). A stream's first event
waits for the verdict and the first text, so errors found before any token
(bad input, a full queue) are ordinary HTTP errors.

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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..calls import Call, Event, aevents, open_call
from ..config import validated_copy
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
from ..messages import check_counts
from ..observability.audit import AuditLog, note_request_id
from ..openai_format import to_hf_messages
from ..verdict import Verdict
from .answers import Answer, chain, collect, merged, wire_logprobs
from .body import parse_json_body
from .conformance import check_content_type, check_model, input_error_code, validation_error_fields
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
    """Loads the served model once and hands out the engines that answer requests.

    `load()` blocks (a CLI runs it in the background; a Ray replica in its
    constructor, so a failed load marks the replica unhealthy). Engines with
    per-request SafeCoDe settings share the loaded weights and the scheduler.
    """

    def __init__(self, settings: ServerSettings, *, judge: Any = None) -> None:
        self.settings = settings
        self.judge = judge if judge is not None else settings.judge
        self.engine: SafeCoDe | None = None
        self.error: str | None = None
        self._variants: OrderedDict[str, SafeCoDe] = OrderedDict()
        self._lock = threading.Lock()
        self._loaded = threading.Event()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def load(self) -> None:
        s = self.settings
        try:
            path = s.model
            if path == "demo":
                path = str(demo_model.ensure_demo_model())
            self.engine = SafeCoDe.from_pretrained(
                path, config=s.safecode, judge=self.judge, policy=s.policy, device=s.device, dtype=s.dtype,
                batching=s.batching,
            )
            # traces, audit lines and messages name the served model, never its local path
            self.engine.model_name = s.name
        except Exception as exc:
            # kept for /ready and the logs; clients only ever see "not ready"
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._loaded.set()

    def engine_for(self, extra: SafeCoDeRequestSettings | None) -> SafeCoDe:
        """The engine for a request: the served one, or one with the request's settings on the same weights."""
        engine = self.engine
        assert engine is not None
        if extra is None or (extra.judge is None and not extra.config_updates()):
            return engine
        config = validated_copy(self.settings.safecode, extra.config_updates())  # the client's values, validated
        judge = extra.judge or self.judge
        key = json.dumps([config.model_dump(mode="json"), judge if isinstance(judge, str) else id(judge)])
        with self._lock:
            variant = self._variants.get(key)
            if variant is None:
                variant = SafeCoDe(
                    engine.model, engine.processor, config=config, judge=judge, policy=self.settings.policy,
                    model_name=engine.model_name,
                )
                self._variants[key] = variant
                while len(self._variants) > _VARIANTS:
                    self._variants.popitem(last=False)
            else:
                self._variants.move_to_end(key)
            return variant


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
        status, message, type_, param, code, headers = 400, str(exc), "invalid_request_error", exc.param, input_error_code(exc), {}
    elif isinstance(exc, RecursionError):  # a walk over a deeply nested request (json, pydantic, repr)
        return error_response(_too_deep())
    elif isinstance(exc, ValidationError):  # the request's schema: 400, as OpenAI answers it
        status, type_, headers = 400, "invalid_request_error", {}
        message, param, code = validation_error_fields(exc)
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
    """`POST /v1/chat/completions`: protocol objects in, engine calls (`calls.open_call`), protocol objects out."""

    def __init__(self, host: ModelHost, metrics: Metrics) -> None:
        self.host = host
        self.metrics = metrics

    def read(self, body: bytes) -> tuple[Any, ChatCompletionRequest, list[dict[str, Any]]]:
        """The body as (payload, request, Hugging Face messages), every limit checked before the next step.

        Runs in a preparation thread (never on the event loop): the JSON
        structure budget before parsing, the schema, the model name, then the
        message and part counts before any message is converted.
        """
        s = self.host.settings
        payload = parse_json_body(body, max_items=s.max_json_values, max_depth=s.max_json_depth)
        if not isinstance(payload, dict):
            raise APIError(400, "The request body must be a JSON object.", "invalid_request_error", code="invalid_json")
        req = ChatCompletionRequest.model_validate(payload)
        if (unknown := check_model(req.model, s.names)) is not None:
            raise APIError(404, unknown, "invalid_request_error", param="model", code="model_not_found")
        check_counts(req.messages, s.policy)
        return payload, req, to_hf_messages(req.messages)

    def _open(
        self, req: ChatCompletionRequest, messages: list[dict[str, Any]], index: int = 0, verdict: Verdict | None = None,
        *, start: bool = True,
    ) -> Call:
        """Choice `index` of `req`, judged and queued (a preparation thread runs this; `start=False`: not
        queued yet). Later choices take the first one's `verdict` (the judge runs once) and their own
        sampler (`seed + index`)."""
        params = req.sampling(self.host.settings.max_new_tokens)
        if index and params.seed is not None:
            params = validated_copy(params, {"seed": (params.seed + index) % 2**63})
        if req.tool_choice not in (None, "none", "auto") and not req.tools:
            raise APIError(400, "tool_choice was given without tools.", "invalid_request_error", param="tool_choice")
        pinned = req.safecode.verdict if req.safecode is not None else None
        return open_call(
            self.host.engine_for(req.safecode), messages, params, tools=req.tools or None,
            tool_choice=req.tool_choice if req.tools else None, parallel_tool_calls=req.parallel_tool_calls,
            response_format=req.format, verdict=verdict if verdict is not None else pinned, start=start,
        )

    def _open_choices(self, req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> list[Call]:
        """Every choice of `req`, queued in one step: the first is judged, the others take its verdict,
        and all are prefilled once (the others copy the first one's rows; each has its own sampler)."""
        first = self._open(req, messages, start=req.n == 1)
        if req.n == 1:
            return [first]
        calls = [first]
        try:
            calls += [self._open(req, messages, i, first.verdict, start=False) for i in range(1, req.n)]
            first.pieces.start(*(c.pieces for c in calls[1:]))
        except BaseException:
            for call in calls:
                call.pieces.close()  # never queued: nothing was decoded
            raise
        return calls

    async def create(
        self, req: ChatCompletionRequest, messages: list[dict[str, Any]], started: float,
        watcher: asyncio.Task[None] | None = None,
    ) -> Response:
        """The answer; a streamed one takes over `watcher` (the client's connection) until it ends."""
        if req.safecode is not None and not self.host.settings.allow_request_settings:
            raise APIError(
                400, "Per-request SafeCoDe settings are off on this server; the judge, threshold and image policy "
                "are the server's. Remove the `safecode` field, or start the server with --allow-request-settings.",
                "invalid_request_error", param="safecode", code="request_settings_disabled",
            )
        call, *others = await arun_briefly(lambda: self._open_choices(req, messages))
        events = aevents(call).__aiter__()
        try:
            first = await events.__anext__()  # the verdict, and errors found before any token
        except BaseException:
            await events.aclose()  # type: ignore[attr-defined]
            for other in others:
                other.pieces.close()
            raise
        ttft = time.perf_counter() - started
        assert first.safety is not None
        headers = {VERDICT_HEADER: str(first.safety.get("verdict"))}
        # a constrained request under an unsafe verdict: the answer is a refusal, not JSON
        refusal = req.constrained and first.safety.get("verdict") == "unsafe"
        cid = completion_id()
        note_request_id(cid)  # the audit line and the trace name the id the client gets
        # n > 1: the other choices share this one's verdict (the judge ran once) and its prefill, and
        # decode alongside it, each with its own sampler

        def other_events(index: int) -> AsyncIterator[Event]:
            return aevents(others[index - 1])

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            choices = [chain(first, events), *(other_events(i) for i in range(1, req.n))]
            stream = self._stream(
                cid, first, merged(choices), include_usage, started, ttft, watcher, refusal=refusal, others=others
            )
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        answer_refusal = call.engine.config.answer_refusal

        async def another(index: int) -> Answer:
            return await collect(other_events(index), answer_refusal)

        tasks = [asyncio.ensure_future(collect(chain(first, events), answer_refusal))]
        tasks += [asyncio.ensure_future(another(i)) for i in range(1, req.n)]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one choice failed (or the client left): the others stop decoding
                task.cancel()
            raise
        finally:
            for other in others:  # also those whose task was cancelled before it began reading
                other.pieces.close()
        completion = self._completion(cid, answers, started, ttft, refusal=refusal)
        return JSONResponse(completion.model_dump(exclude_none=False), headers=headers)

    def _completion(
        self, cid: str, answers: list[Answer], started: float, ttft: float, *, refusal: bool = False
    ) -> ChatCompletion:
        """`refusal`: a constrained request refused under an unsafe verdict (`message.refusal`, content null)."""
        choices = [
            Choice(
                index=i, finish_reason=a.finish_reason, logprobs=wire_logprobs(a.result),
                closed_early=a.result.closed_early or None,
                message=ChatMessage(content=None, refusal=a.text) if refusal else
                ChatMessage(content=a.text or (None if a.tool_calls else ""), tool_calls=a.tool_calls or None),
            )
            for i, a in enumerate(answers)
        ]
        # the prompt is counted once: every choice answers the same prompt
        prompt = answers[0].result.usage.prompt_tokens
        completion = sum(a.result.usage.completion_tokens for a in answers)
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        safety = answers[0].safety
        self._finished(safety, usage, started, ttft)
        return ChatCompletion(id=cid, model=self.host.settings.name, choices=choices, usage=usage, safety=public_safety(safety))

    def _finished(self, safety: dict[str, Any], usage: Usage, started: float, ttft: float) -> None:
        self.metrics.record_answer(safety, usage.prompt_tokens, usage.completion_tokens)
        self.metrics.latency.observe(time.perf_counter() - started)
        self.metrics.ttft.observe(ttft)

    async def _stream(
        self, cid: str, first: Event, events: AsyncIterator[tuple[int, Event]], include_usage: bool, started: float,
        ttft: float, watcher: asyncio.Task[None] | None, *, refusal: bool = False, others: Sequence[Call] = (),
    ) -> AsyncIterator[str]:
        """Server-sent events of one or more choices (`events` yields `(choice index, event)`); the
        `safety` object rides on the very first event, each choice ends with its own finish event."""
        name = self.host.settings.name
        assert first.safety is not None
        safety = dict(first.safety)
        shown = public_safety(safety)
        called: set[int] = set()
        prompt = completion = 0
        late: dict[str, Any] = {}

        def chunk_of(index: int, event: Event) -> ChatCompletionChunk:
            calls = [
                DeltaToolCall(index=c["index"], id=c["id"], type="function",
                              function=DeltaFunction(name=c["name"], arguments=c["args"]))
                for c in event.calls
            ]
            text = event.text if (event.text or event.first) else None
            delta = Delta(role="assistant" if event.first else None, tool_calls=calls or None,
                          **({"refusal": text} if refusal else {"content": text}))
            return ChatCompletionChunk(id=cid, model=name, choices=[ChunkChoice(index=index, delta=delta)],
                                       safety=shown if event is first else None)

        finished = False
        try:
            async for index, event in events:
                if not event.last:
                    if event.calls:
                        called.add(index)
                    if event.text or event.calls or event.first:
                        yield chunk_of(index, event).sse()
                    continue
                result = event.result
                assert result is not None
                # logprobs of the whole answer ride on its last event (clients concatenate them)
                last = ChatCompletionChunk(id=cid, model=name, choices=[ChunkChoice(
                    index=index, delta=Delta(), finish_reason="tool_calls" if index in called else result.finish_reason,
                    logprobs=wire_logprobs(result), closed_early=result.closed_early or None,
                )])
                extra = event.safety or {}
                if extra.get("blocked_tool_calls"):
                    last.safety = {"blocked_tool_calls": extra["blocked_tool_calls"]}
                if extra.get("answer_check") is not None:
                    # the answer was streamed already: the last event flags what the answer check found
                    last.safety = public_safety({**(last.safety or {}), "answer_check": extra["answer_check"]})
                if index == 0:
                    late = extra
                yield last.sse()
                prompt = result.usage.prompt_tokens  # every choice answers the same prompt: counted once
                completion += result.usage.completion_tokens
            usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
            if include_usage:
                yield ChatCompletionChunk(id=cid, model=name, choices=[], usage=usage).sse()
            yield "data: [DONE]\n\n"
            finished = True
            self._finished({**safety, **late}, usage, started, ttft)
        except Exception as exc:  # an error after the first event: OpenAI's error object as an event
            body = json.loads(error_response(exc).body)
            yield "data: " + json.dumps(body) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if watcher is not None:
                watcher.cancel()
            # a client that went away (or an error) stops decoding: its rows leave the batch
            await events.aclose()  # type: ignore[attr-defined]
            for other in others:  # choices whose reader never began (no effect on finished ones)
                other.pieces.close()
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
                if (not_json := check_content_type(request.headers.get("content-type"))) is not None:
                    raise APIError(415, not_json, "invalid_request_error", code="unsupported_media_type")
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
        return JSONResponse(ModelList(data=[ModelCard(id=name) for name in settings.names]).model_dump())

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
    assert host.engine is not None
    metrics.watch_engine(host.engine.scheduler)


def _version() -> str:
    return __version__

