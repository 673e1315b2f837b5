"""One chat call on the engine, framework-neutral: what `ChatSafeCoDe` and the HTTP server share.

Flow: Hugging Face chat messages + `SamplingParams` + the call's tools,
`tool_choice`, `parallel_tool_calls` and `response_format` -> `open_call`
(the tool plan or JSON mode, the judge, a reopened plain-text stream under
an unsafe verdict, the queue) -> a `Call` -> `CallEvents` turns its text
pieces into events: the first (with the `safety` object, once the refusal
decision is known), text and tool-call deltas, and the last (finish reason,
usage, blocked calls, the answer check, logprobs). LangChain chunks and
OpenAI's wire format are both renderings of these events.

Tool calls in events are plain dicts `{"index", "id", "name", "args"}`:
`args` is a valid call's arguments as a JSON object text, or an invalid
call's raw text as a JSON *string* (see `AnswerReader`).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import constrained
from . import tool_parsing as tools_mod
from .control import arun_briefly
from .engine.core import SafeCoDe
from .engine.results import SafeCoDeResult, SafeCoDeStream
from .errors import SafeCoDeInputError
from .messages import check_nesting
from .ops import refusal_decision
from .prompting import render_prompt
from .sampling import SamplingParams
from .verdict import Verdict, answer_check_metadata, safety_metadata

__all__ = [
    "AnswerReader",
    "Call",
    "CallEvents",
    "CallPlan",
    "Event",
    "aevents",
    "call_tags",
    "forced_call_grammar",
    "json_answer_plan",
    "open_call",
    "response_format_schema",
    "tool_template",
]


@dataclass(frozen=True)
class CallPlan:
    """How one call uses tools or JSON mode: what the prompt gets and how the answer is read."""

    names: tuple[str, ...] | None = None
    """The offered tools' names; None when no tools are offered (no tool parsing, no `blocked_tool_calls`)."""
    parse: bool = False
    """Read tool calls out of the answer (False for `tool_choice="none"` and JSON mode)."""
    prefix: str = ""
    """The answer's forced opening (a tool call's start, or "{" in JSON mode); part of the answer."""
    parallel: bool = True
    """False keeps only the first valid call (`parallel_tool_calls=False`); later ones become invalid."""


_TEMPLATES: weakref.WeakKeyDictionary[Any, tuple[str, tools_mod.ToolTemplate]] = weakref.WeakKeyDictionary()
_TEMPLATES_LOCK = threading.Lock()


def tool_template(engine: SafeCoDe) -> tools_mod.ToolTemplate:
    """What `engine`'s chat template does with tools, probed once per template (`UnsupportedModelError` if nothing)."""
    processor = engine.processor
    template = getattr(processor, "chat_template", None) or getattr(engine.tokenizer, "chat_template", None)
    key = str(template)
    with _TEMPLATES_LOCK:
        held = _TEMPLATES.get(engine)
        if held is not None and held[0] == key:
            return held[1]

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool) -> str:
        return render_prompt(processor, messages, engine.specials, tools=tools, add_generation_prompt=gen)

    probed = tools_mod.probe_tool_template(render, repr(engine.model_name), engine.specials)
    with _TEMPLATES_LOCK:
        _TEMPLATES[engine] = (key, probed)
    return probed


def call_tags(tokenizer: Any, template: tools_mod.ToolTemplate) -> dict[str, int]:
    """The call layout's tags that `tokenizer` has as tokens of their own (Qwen's `<tool_call>`,
    `</tool_call>`): tag text -> token id. Grammars let the model write them as those tokens."""
    layout = (template.call_open or "") + (template.call_close or "")
    try:
        added = tokenizer.get_added_vocab()
    except Exception:  # a tokenizer without added tokens
        return {}
    return {text: int(i) for text, i in added.items() if text.strip() and text in layout}


def forced_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    choice: str,
    template: tools_mod.ToolTemplate,
    tags: Mapping[str, int] | None = None,
    *,
    parallel: bool = True,
) -> constrained.Constraint | None:
    """The grammar of the rest of a call: a forced one, or under `choice="auto"` the whole answer,
    free text with calls whose JSON is constrained (None: the layout is unknown, or llguidance is missing)."""
    if not constrained.available():
        return None
    if choice == "auto":
        if template.call_open is None or template.name_to_args is None or template.call_close is None:
            return None
        opening = template.call_open.lstrip()
        if opening.startswith(tools_mod.CALL_OPEN):
            marker: str | None = tools_mod.CALL_OPEN
        elif opening[:1] in ("{", "["):
            marker = None  # the answer reader takes an answer that opens with JSON for calls
        else:
            return None
        return constrained.auto_call_constraint(
            constrained.tool_parameters(tools), call_open=opening, name_to_args=template.name_to_args,
            call_close=template.call_close, marker=marker, parallel=parallel, tags=tags,
        )
    return constrained.forced_call_constraint(
        tools, choice, name_to_args=template.name_to_args, close=template.call_close, tags=tags
    )


def json_answer_plan(json_schema: Mapping[str, Any] | None) -> tuple[CallPlan, constrained.Constraint | None]:
    """A JSON answer with no tools offered: written under the schema's grammar (JSON mode: any object),
    or, without llguidance, opened with "{" and left to the model."""
    if not constrained.available():
        return CallPlan(prefix="{"), None
    if json_schema is None:
        return CallPlan(), constrained.json_object_constraint()
    return CallPlan(), constrained.json_schema_constraint(json_schema)


def uses_tools(hf_messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in hf_messages)


def response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI-style `response_format` (None for plain JSON mode)."""
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "json_object":
        return None
    if kind == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if isinstance(schema, Mapping):
            check_nesting(schema, "The `response_format` schema")
            return dict(schema)
    raise SafeCoDeInputError(
        f"`response_format` (={response_format!r}) must be {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}. Or use with_structured_output(schema)."
    )


# --------------------------------------------------------------------------- reading the answer


@dataclass
class AnswerReader:
    """Reads an answer's text under a `CallPlan` into `(text, tool_call_deltas)` pairs.

    A valid call is one delta whose `args` is its arguments as a JSON object.
    An invalid call (malformed, unknown tool, cut off, or a second call under
    `parallel_tool_calls=False`) is one delta whose `args` is the call's raw
    text as a JSON *string*: a client that repairs truncated JSON objects
    (LangChain's chunk merging does) would make a cut-off call runnable, while
    a string always stays an invalid call. The reason is kept in `errors`.
    Calls made under an unsafe verdict go to `blocked` instead, as parsed.
    """

    plan: CallPlan | None
    unsafe: bool
    blocked: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    valid_calls: int = 0
    _splitter: tools_mod.ToolCallSplitter | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.plan is not None and self.plan.parse:
            self._splitter = tools_mod.ToolCallSplitter()

    def feed(self, text: str) -> list[tuple[str, list[dict[str, Any]]]]:
        events = self._splitter.feed(text) if self._splitter else ([text] if text else [])
        return self._convert(events)

    def finish(self) -> list[tuple[str, list[dict[str, Any]]]]:
        return self._convert(self._splitter.finish()) if self._splitter else []

    def _convert(self, events: list[tools_mod.Event]) -> list[tuple[str, list[dict[str, Any]]]]:
        out: list[tuple[str, list[dict[str, Any]]]] = []
        for event in events:
            if isinstance(event, str):
                out.append((event, []))
                continue
            assert self.plan is not None and self.plan.names is not None
            call: Any = dict(tools_mod.parse_raw_call(event, self.plan.names))
            if self.unsafe:
                self.blocked.append(call)  # an unsafe scene must not trigger actions
                continue
            if call["type"] == "tool_call" and self.valid_calls and not self.plan.parallel:
                call = {
                    "type": "invalid_tool_call", "name": call["name"], "id": call["id"],
                    "args": json.dumps(call["args"], ensure_ascii=False),
                    "error": "parallel_tool_calls=False: only the first tool call is kept",
                }
            index, self.calls = self.calls, self.calls + 1
            if call["type"] == "tool_call":
                self.valid_calls += 1
            else:
                self.errors[call["id"]] = call["error"]
            args = json.dumps(call["args"], ensure_ascii=False)  # an invalid call's raw text: a JSON string
            out.append(("", [{"index": index, "id": call["id"], "name": call["name"], "args": args}]))
        return out


# --------------------------------------------------------------------------- the call


@dataclass
class Call:
    """One started call: the engine, its stream, how to read the answer, and the verdict to report."""

    engine: SafeCoDe
    pieces: SafeCoDeStream
    plan: CallPlan | None
    verdict: Verdict
    check: Callable[[str], Verdict] | None = None
    """The answer check (`SafeCoDeConfig.check_answer`): the judge's verdict on the finished answer."""

    def answer(self) -> str:
        """The finished answer's text as the model wrote it (a forced opening included)."""
        result = self.pieces.result
        assert result is not None
        return (self.plan.prefix if self.plan is not None else "") + result.text


class NoRetry:
    """`open_call`'s retry policy when a caller has none: one attempt, no deadline of its own."""

    def left(self) -> dict[str, Any]:
        return {}

    def judged(self, open_stream: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        return open_stream()

    def queued(self, pieces: SafeCoDeStream, reopen: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        return pieces.start()


def open_call(
    engine: SafeCoDe,
    hf_messages: list[dict[str, Any]],
    sampling: SamplingParams,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
    response_format: Any = None,
    verdict: Verdict | str | None = None,
    retry: Any = None,
    start: bool = True,
) -> Call:
    """Plan the call (tools, JSON mode), judge, and queue it for decoding: the verdict is known on return.

    `tools` are OpenAI-format function schemas (a LangChain face converts its tools first).

    Under an unsafe verdict a forced opening would put the refusal inside a
    tool call's JSON or a JSON answer, so such a stream is closed before it
    decodes anything and reopened under the same verdict as plain text: no
    forced prefix, no JSON instruction, and no tools when a tool call was
    forced. A forced call's rest, an "auto" answer's calls and a JSON answer
    without tools are decoded under a grammar (`constrained`, with llguidance
    installed): a call's name is a bound tool's and its arguments validate
    against that tool's schema ("auto": the text around calls stays free), the
    JSON answer against `response_format`'s schema; the reopened refusal is free text. `retry` (`left()`, `judged(open)`, `queued(pieces, reopen)`) may
    retry what a local model fails for a moment; default one attempt. `start=False` leaves the stream
    unqueued (`call.pieces.start(...)`, e.g. with the other choices of one request; no retry then).
    """
    retry = retry or NoRetry()
    formatted = tools_mod.checked_function_tools(tools) if tools else None
    names = tools_mod.tool_names(formatted) if formatted else []
    choice = tools_mod.normalize_tool_choice(tool_choice, names) if formatted else "auto"
    if tool_choice not in (None, "auto", "none") and not formatted:
        raise SafeCoDeInputError(
            f"`tool_choice` (={tool_choice!r}) was given without tools. Use llm.bind_tools(tools, tool_choice=...)."
        )
    json_mode = response_format is not None
    json_schema = response_format_schema(response_format) if json_mode else None
    # the engine's own keyword arguments (it validates them into the same SamplingParams)
    options: dict[str, Any] = {**sampling.model_dump(exclude_none=True), "verdict": verdict}
    options.update(stop=list(sampling.stop), seed=sampling.seed)  # None: fresh randomness, said explicitly
    plan: CallPlan | None = None
    constraint: constrained.Constraint | None = None
    if formatted or uses_tools(hf_messages):
        template = tool_template(engine)  # UnsupportedModelError when the template has no tools
        if formatted and choice != "none":  # "none": the tools are not offered at all
            plan = CallPlan(
                names=tuple(names),
                prefix=tools_mod.forced_prefix(template, choice, names),
                parallel=parallel_tool_calls is not False,
                parse=True,
            )
            options["tools"] = formatted
            # "auto" with JSON mode stays free: its answer is JSON or calls, and the prompt says which
            if choice != "auto" or not json_mode:
                tags = call_tags(engine.tokenizer, template)
                constraint = forced_call_grammar(formatted, choice, template, tags, parallel=plan.parallel)
        elif formatted:
            plan = CallPlan(names=tuple(names), parse=False)
    prompt_messages = hf_messages
    if json_mode:
        # With tools offered the model may call them first, so the answer cannot be opened with "{".
        offered = plan is not None and plan.parse
        if not offered:
            plan, constraint = json_answer_plan(json_schema)
        text = tools_mod.json_instruction(json_schema, with_tools=offered)
        prompt_messages = [{"role": "system", "content": [{"type": "text", "text": text}]}, *hf_messages]
    if plan is not None and plan.prefix:
        options["answer_prefix"] = plan.prefix
        if constraint is not None and sampling.min_tokens:  # a forced call ends with its JSON
            raise constrained.ended_by_grammar(sampling.min_tokens)
    if constraint is not None:
        options["constraint"] = constraint
    pieces = retry.judged(lambda: engine.stream(prompt_messages, start=False, **options, **retry.left()))
    decided = pieces.verdict
    assert decided is not None  # SafeCoDe.stream decides the verdict before returning
    if decided.label == "unsafe" and (json_mode or (plan is not None and plan.prefix)):
        pieces.close()  # never queued: nothing was decoded
        forced = plan is not None and bool(plan.prefix)
        if plan is not None and plan.names is not None:
            plan = replace(plan, prefix="")
            if forced:
                options.pop("tools", None)
        else:
            plan = None
        options.pop("answer_prefix", None)
        options.pop("constraint", None)  # a refusal is free text, never schema-shaped
        prompt_messages = hf_messages
        pieces = engine.stream(hf_messages, start=False, **{**options, "verdict": decided}, **retry.left())
    # A full queue refuses before anything is decoded: queue the same request again under
    # the verdict already decided (the judge does not run twice).
    reopen = lambda: engine.stream(prompt_messages, start=False, **{**options, "verdict": decided}, **retry.left())  # noqa: E731
    check = None
    if engine.config.check_answer:
        offered_tools = options.get("tools")
        check = lambda answer: engine.check_answer(prompt_messages, answer, tools=offered_tools)  # noqa: E731
    return Call(engine, retry.queued(pieces, reopen) if start else pieces, plan, decided, check)


# --------------------------------------------------------------------------- events


@dataclass
class Event:
    """One step of an answer: text and tool-call deltas; `safety` on the first, `last` on the last."""

    text: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    safety: dict[str, Any] | None = None
    """The first event's `safety` object (SPEC section 5); on the last event, what is added to it
    (`blocked_tool_calls`, `answer_check`)."""
    first: bool = False
    last: bool = False
    finish_reason: str | None = None
    result: SafeCoDeResult | None = None
    """The engine's result, on the last event (usage, logprobs)."""
    invalid_call_errors: dict[str, str] = field(default_factory=dict)


class CallEvents:
    """A `Call`'s text pieces as `Event`s: `safety` on the first, the accounting on the last.

    Text is held back only until `refusal_decision` can fill `safety["refused"]`.
    With tools offered, an `AnswerReader` turns the text into content and one
    tool-call delta per finished call. The same builder serves the sync and
    async paths and every rendering, so they cannot differ.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.reader = AnswerReader(call.plan, unsafe=call.verdict.label == "unsafe")
        self.pending = self.reader.feed(call.plan.prefix) if call.plan is not None else []
        self.held = ""
        self.refused: bool | None = None

    def _first(self, refused: bool) -> Event:
        call = self.call
        safety = safety_metadata(call.verdict, call.engine.config, refused)
        if call.plan is not None and call.plan.names is not None:
            safety["blocked_tool_calls"] = []
        event = Event(
            text="".join(text for text, _ in self.pending), calls=[c for _, calls in self.pending for c in calls],
            safety=safety, first=True,
        )
        self.pending = []
        return event

    def feed(self, piece: str) -> list[Event]:
        self.pending.extend(self.reader.feed(piece))
        if self.refused is None:
            self.held += piece
            self.refused = refusal_decision(self.held, self.call.engine.config.refusal_phrases)
            if self.refused is None:
                return []
            return [self._first(self.refused)]
        out = [Event(text=text, calls=calls) for text, calls in self.pending]
        self.pending = []
        return out

    def finish(self, answer_check: Verdict | None = None) -> list[Event]:
        reader = self.reader
        self.pending.extend(reader.finish())
        result = self.call.pieces.result
        assert result is not None
        out: list[Event] = []
        if self.refused is None:  # the answer ended before its opening decided (e.g. an empty answer)
            out.append(self._first(result.refused))
        out += [Event(text=text, calls=calls) for text, calls in self.pending]
        self.pending = []
        extra: dict[str, Any] = {}
        if reader.blocked:
            extra["blocked_tool_calls"] = reader.blocked
        if answer_check is not None:
            # the text is out already: flagged here; a caller that has not shown it replaces it
            extra["answer_check"] = answer_check_metadata(answer_check, replaced=False)
        out.append(Event(
            safety=extra or None, last=True, finish_reason=result.finish_reason, result=result,
            invalid_call_errors=dict(reader.errors),
        ))
        return out


async def aevents(call: Call) -> AsyncIterator[Event]:
    """The `Event`s of a started `call`, read on the event loop; the answer check runs off it.
    Leaving early (or being cancelled) closes the stream: its rows leave the batch."""
    builder = CallEvents(call)
    try:
        async for piece in call.pieces:
            for event in builder.feed(piece):
                yield event
        check = None
        if call.check is not None:
            checker = call.check
            check = await arun_briefly(lambda: checker(call.answer()))
        for event in builder.finish(check):
            yield event
    finally:
        call.pieces.close()
