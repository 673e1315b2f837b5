"""Tool calling for local chat templates, as small pure functions.

Input flow (rendering): LangChain tools, pydantic models, typed functions or
OpenAI-format dicts -> `format_tools` (OpenAI function schemas, names
checked) -> the chat template's own `tools=` argument. Earlier tool calls and
tool results travel as transformers chat messages (`hf_tool_calls`).

Whether a template can do tools at all is read from the template itself:
`probe_tool_template` renders a dummy tool and a dummy call through it. A
template that ignores the tool has no tool support (`UnsupportedModelError`);
one that renders the call tells us the text that opens a call, which
`forced_prefix` uses to honour `tool_choice` by starting the answer with it.

Output flow (parsing): the answer text -> `ToolCallSplitter` -> text pieces
and raw calls -> `parse_raw_call` -> LangChain `ToolCall` / `InvalidToolCall`.
Two formats are read:

- Qwen / Hermes tags: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  anywhere in the answer, any number of them;
- plain JSON (Llama 3.x, Mistral after its special token is dropped): an
  answer that is nothing but a call object `{"name": ..., "parameters"|"arguments": ...}`,
  a list of them, or several separated by `;`.

A call that cannot be read (bad JSON, unknown tool, arguments that are not
an object, a tag never closed) becomes an `InvalidToolCall` carrying the raw
text and the reason: never an exception, never a guessed call. The same
splitter runs on the whole answer (`parse_answer`) and on a stream of pieces,
so `invoke` and `stream` agree by construction.

Shortcuts, said plainly: arguments are not constrained while decoding (no
grammar), so a model may write arguments that do not fit the schema; the
parsers of `with_structured_output` validate them afterwards. A forced
`tool_choice` only opens the call; the model writes the rest.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.exceptions import ModelRefusalError, OutputParserException
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.tool import InvalidToolCall, ToolCall, invalid_tool_call, tool_call
from langchain_core.output_parsers import BaseGenerationOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from ..errors import SafeCoDeInputError, UnsupportedContentError, UnsupportedModelError
from ..messages import MAX_NESTING_DEPTH, check_nesting, json_text_depth, nesting_depth

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "INVALID_CALL_ERRORS",
    "PROBE_TOOL",
    "JsonAnswerParser",
    "ParsedAnswer",
    "RawCall",
    "ToolCallSplitter",
    "ToolChoice",
    "ToolTemplate",
    "ToolsAnswerParser",
    "check_nesting",
    "forced_prefix",
    "format_tools",
    "hf_tool_calls",
    "json_instruction",
    "json_text_depth",
    "nesting_depth",
    "normalize_tool_choice",
    "parse_answer",
    "parse_raw_call",
    "probe_tool_template",
    "raise_if_unsafe",
    "tool_names",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

#: `response_metadata` key holding why each invalid tool call is invalid: `{call id: reason}`.
#: (LangChain's chunk merging keeps only name, args and id of a call, so the reason travels here,
#: the same for `invoke` and merged `stream` chunks.)
INVALID_CALL_ERRORS = "invalid_tool_call_errors"

#: "auto": the model decides; "none": no tools offered; "any": some call; else a tool's name.
ToolChoice = str

# What providers accept for a tool name; it also keeps names safe inside a forced JSON prefix.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# The start of a plain-JSON call, to tell a malformed call from an ordinary JSON answer.
_JSON_CALL_START = re.compile(r'^\s*\[?\s*\{\s*"name"\s*:')
_ARG_KEYS = ("arguments", "parameters")
_CALL_KEYS = frozenset({"name", "id", "type", *_ARG_KEYS})


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --------------------------------------------------------------------------- tool schemas


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-format function schemas (`{"type": "function", "function": {...}}`) for `tools`.

    Accepts what `bind_tools` does elsewhere in LangChain: `BaseTool`s,
    pydantic models, TypedDicts, typed Python functions and dicts (OpenAI
    format or a JSON schema with a title). Provider built-in tools (e.g.
    `{"type": "web_search"}`) cannot run locally and are refused.
    """
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise UnsupportedContentError(
            f"`tools` must be a list of tools, got a {type(tools).__name__}. Pass e.g. [my_tool]."
        )
    formatted: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, Mapping):  # a schema written by hand: bounded before LangChain walks it
            check_nesting(tool, f"tools[{i}]")
        try:
            schema = convert_to_openai_tool(tool)
        except Exception as exc:  # LangChain raises ValueError, TypeError or KeyError here
            raise UnsupportedContentError(
                f"tools[{i}] ({type(tool).__name__}) cannot be turned into a function schema: {exc}. "
                "Pass a LangChain tool, a pydantic model, a typed Python function, or "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}.'
            ) from exc
        function = schema.get("function") if isinstance(schema, Mapping) else None
        if schema.get("type") == "function" and not isinstance(function, Mapping):
            raise UnsupportedContentError(
                f'tools[{i}] says "type": "function" but holds no function schema. Give '
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}.'
            )
        if schema.get("type") != "function" or not isinstance(function, Mapping):
            raise UnsupportedContentError(
                f"tools[{i}] is a {schema.get('type')!r} tool; a local model can only call function "
                'tools. Remove it, or describe it as {"type": "function", "function": {...}}.'
            )
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UnsupportedContentError(
                f"tools[{i}] has the name {name!r}; a tool name must be 1-64 characters of letters, "
                "digits, '_', '-' or '.'. Rename the tool."
            )
        check_nesting(function, f"tools[{i}] ({name!r})")
        formatted.append({"type": "function", "function": dict(function)})
    return formatted


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """The function names of OpenAI-format `tools`, in order."""
    return [str(t["function"]["name"]) for t in tools]


def normalize_tool_choice(choice: Any, names: Sequence[str]) -> ToolChoice:
    """`tool_choice` in LangChain's and OpenAI's spellings -> "auto" | "none" | "any" | a tool name.

    None and "auto": the model decides. "none" (or False): tools are not
    offered. "any", "required" (or True): some tool must be called. A tool
    name, `{"type": "function", "function": {"name": ...}}` or
    `{"type": "tool", "name": ...}`: that tool must be called.
    """
    if choice is None or choice == "auto":
        return "auto"
    if choice is False or choice == "none":
        return "none"
    if choice is True or choice in ("any", "required"):
        return "any"
    name = choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if name is None and choice.get("type") in ("any", "auto", "none"):
            return normalize_tool_choice(choice["type"], names)
    if isinstance(name, str) and name in names:
        return name
    raise SafeCoDeInputError(
        f"`tool_choice` (={choice!r}) must be 'auto', 'none', 'any' / 'required', or the name of a "
        f"bound tool ({list(names)})."
    )


def hf_tool_calls(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """LangChain `ToolCall`s of an earlier assistant turn in the transformers chat format.

    Arguments nested deeper than `MAX_NESTING_DEPTH` raise `InputLimitError`.
    """
    out = []
    for i, call in enumerate(calls):
        args = call.get("args") or {}
        if not isinstance(args, Mapping):
            raise UnsupportedContentError(
                f"tool_calls[{i}] ({call.get('name')!r}) has arguments of type {type(args).__name__}; "
                'they must be a dict, e.g. {"city": "Paris"}.'
            )
        check_nesting(args, f"The arguments of tool_calls[{i}] ({call.get('name')!r})")
        item: dict[str, Any] = {
            "type": "function",
            "function": {"name": str(call["name"]), "arguments": dict(args)},
        }
        if call.get("id"):
            item["id"] = str(call["id"])
        out.append(item)
    return out


# --------------------------------------------------------------------------- templates

_PROBE_NAME = "safecode_probe_tool"
_PROBE_ARG = "safecode_probe_arg"

#: The dummy tool `probe_tool_template` renders.
PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": _PROBE_NAME,
        "description": "Probe.",
        "parameters": {
            "type": "object",
            "properties": {_PROBE_ARG: {"type": "string"}},
            "required": [_PROBE_ARG],
        },
    },
}

#: `render(messages, tools, add_generation_prompt) -> prompt`: the engine's own rendering.
Render = Callable[[list[dict[str, Any]], "list[dict[str, Any]] | None", bool], str]


@dataclass(frozen=True)
class ToolTemplate:
    """What the chat template showed about tool calls.

    `call_open` is the answer text before a call's tool name
    (`'<tool_call>\\n{"name": "'` for Qwen, `'{"name": "'` for Llama 3) and
    `name_to_args` the text between the name and its arguments
    (`'", "arguments": '`). Both are None when the template renders tools
    but its call layout could not be read, so `tool_choice` cannot be forced.
    """

    call_open: str | None
    name_to_args: str | None


def probe_tool_template(render: Render, model_name: str = "this model") -> ToolTemplate:
    """Render a dummy tool and a dummy call through the template; `UnsupportedModelError` if it has no tools."""
    user = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    no_tools_fix = (
        "Use a model whose chat template takes `tools` (e.g. Qwen2.5-VL/Qwen3-VL or Llama-3.2-Vision "
        "chat templates), set `processor.chat_template` to a tool-capable template, or call the model "
        "without tools (for structured output without tools: with_structured_output(schema, method='json_schema'))."
    )
    try:
        head = render(user, [PROBE_TOOL], True)
    except Exception as exc:  # a template may raise_exception() on tools
        raise UnsupportedModelError(
            f"The chat template of {model_name} failed when given tools ({type(exc).__name__}: {exc}). "
            + no_tools_fix
        ) from exc
    if _PROBE_NAME not in head:
        raise UnsupportedModelError(
            f"The chat template of {model_name} has no tool support: rendering it with a tool "
            "does not show the tool to the model. " + no_tools_fix
        )
    call_turn = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "id": "call_probe", "function": {"name": _PROBE_NAME, "arguments": {_PROBE_ARG: "x"}}}
        ],
    }
    try:
        full = render([*user, call_turn], [PROBE_TOOL], False)
    except Exception:  # renders tools but not calls: offering tools still works
        return ToolTemplate(None, None)
    if not full.startswith(head):
        return ToolTemplate(None, None)
    turn = full[len(head) :]
    at_name = turn.find(_PROBE_NAME)
    at_arg = turn.find(f'"{_PROBE_ARG}"', at_name)
    at_args = turn.rfind("{", 0, at_arg) if at_arg > 0 else -1
    if at_name < 0 or at_args < at_name + len(_PROBE_NAME):
        return ToolTemplate(None, None)
    return ToolTemplate(turn[:at_name], turn[at_name + len(_PROBE_NAME) : at_args])


def forced_prefix(template: ToolTemplate, choice: ToolChoice, names: Sequence[str]) -> str:
    """The answer's forced opening for `choice`: "" for auto/none, else the start of a call.

    "any" with one tool is that tool. Raises `UnsupportedModelError` when the
    template's call layout is unknown.
    """
    if choice in ("auto", "none"):
        return ""
    if choice == "any" and len(names) == 1:
        choice = names[0]
    if template.call_open is None or template.name_to_args is None:
        raise UnsupportedModelError(
            f"tool_choice={choice!r} needs the layout of a tool call in the chat template, which could "
            "not be read from it. Use tool_choice='auto' (the model decides)."
        )
    if choice == "any":
        return template.call_open
    return template.call_open + choice + template.name_to_args


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class RawCall:
    """The text of one tool call as the model wrote it; `closed` is False for a tag never closed."""

    text: str
    closed: bool = True


Event = str | RawCall


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest end of `text` that is a proper start of `token` (0 if none)."""
    for k in range(min(len(token) - 1, len(text)), 0, -1):
        if text.endswith(token[:k]):
            return k
    return 0


class ToolCallSplitter:
    """Splits answer text, fed in pieces, into text and raw tool calls.

    `feed(piece)` returns what is settled so far; `finish()` the rest. The
    events do not depend on where the pieces were cut. Text that could still
    turn into `<tool_call>` is held back; whitespace around a call is
    dropped (between two pieces of text, the whitespace after the call
    stays). An answer that opens with `{` or `[` is held to the end, then
    read as plain-JSON calls, or given back as text if it is not one.
    """

    def __init__(self) -> None:
        self._mode: Literal["start", "text", "call", "json"] = "start"
        self._buf = ""
        self._skip_space = False
        self._said_text = False

    def feed(self, piece: str) -> list[Event]:
        self._buf += piece
        events: list[Event] = []
        while True:
            if self._mode == "start":
                head = self._buf.lstrip()
                if not head:
                    return events
                self._mode = "json" if head[0] in "{[" else "text"
            if self._mode == "json":
                return events
            if self._mode == "text":
                if self._skip_space:
                    text = self._buf.lstrip()
                    if not text:
                        return events
                    gap = self._buf[: len(self._buf) - len(text)]
                    self._buf = (gap if self._said_text else "") + text
                    self._skip_space = False
                at = self._buf.find(CALL_OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buf, CALL_OPEN)
                    settled = self._buf[: len(self._buf) - keep]
                    cut = len(settled.rstrip())  # trailing space may yet precede a call
                    self._emit(events, self._buf[:cut])
                    self._buf = self._buf[cut:]
                    return events
                self._emit(events, self._buf[:at].rstrip())
                self._buf, self._mode = self._buf[at + len(CALL_OPEN) :], "call"
            if self._mode == "call":
                close, reopen = self._buf.find(CALL_CLOSE), self._buf.find(CALL_OPEN)
                if reopen >= 0 and (close < 0 or reopen < close):
                    # a new call opened before this one closed: this one ends unterminated
                    events.append(RawCall(self._buf[:reopen], closed=False))
                    self._buf = self._buf[reopen + len(CALL_OPEN) :]
                    continue
                if close < 0:
                    return events
                events.append(RawCall(self._buf[:close]))
                self._buf, self._mode, self._skip_space = self._buf[close + len(CALL_CLOSE) :], "text", True

    def finish(self) -> list[Event]:
        rest, mode = self._buf, self._mode
        self._buf, self._mode = "", "text"
        if mode == "call":  # cut off: drop a half-written closing tag, the JSON is judged alone
            return [RawCall(rest[: len(rest) - _partial_suffix(rest, CALL_CLOSE)], closed=False)]
        if mode == "json":
            return _json_calls(rest)
        if self._skip_space:
            rest = rest.lstrip()
        return [rest] if rest else []

    def _emit(self, events: list[Event], text: str) -> None:
        if text:
            events.append(text)
            self._said_text = True


def _json_calls(text: str) -> list[Event]:
    """A whole answer that opens with `{` or `[`: plain-JSON calls, a malformed call, or just text."""
    if json_text_depth(text) > MAX_NESTING_DEPTH + 3:  # a list of call objects holding arguments
        # too deep to decode safely: a call (then invalid, with the reason) or just text
        return [RawCall(text.strip(), closed=True)] if _JSON_CALL_START.match(text) else [text]
    decoder = json.JSONDecoder()
    values: list[tuple[Any, str]] = []
    at, end = 0, len(text)
    try:
        while True:
            while at < end and (text[at].isspace() or text[at] in ";,"):
                at += 1
            if at == end:
                break
            value, stop = decoder.raw_decode(text, at)
            values.append((value, text[at:stop]))
            at = stop
    except json.JSONDecodeError:
        return [RawCall(text.strip(), closed=True)] if _JSON_CALL_START.match(text) else [text]
    calls: list[Event] = []
    for value, raw in values:
        items = value if isinstance(value, list) else [value]
        if not items or not all(_call_shaped(v) for v in items):
            return [text]  # an ordinary JSON answer, not a call
        calls.extend(RawCall(json.dumps(v)) if isinstance(value, list) else RawCall(raw) for v in items)
    return calls


def _call_shaped(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str) and set(value) <= _CALL_KEYS


def parse_raw_call(
    raw: RawCall, names: Sequence[str], make_id: Callable[[], str] = _new_id
) -> ToolCall | InvalidToolCall:
    """One raw call -> a `ToolCall`, or an `InvalidToolCall` saying what is wrong with it."""
    text = raw.text.strip()
    name: str | None = None

    def invalid(reason: str) -> InvalidToolCall:
        return invalid_tool_call(name=name, args=text, id=make_id(), error=reason)

    if json_text_depth(text) > MAX_NESTING_DEPTH + 2:  # the call object and its arguments object
        match = re.search(r'"name"\s*:\s*"([^"]*)"', text)
        name = match.group(1) if match else None
        return invalid(f"the arguments are nested more than {MAX_NESTING_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        match = re.search(r'"name"\s*:\s*"([^"]*)"', text)
        name = match.group(1) if match else None
        where = "" if raw.closed else f" (the {CALL_OPEN} tag was never closed)"
        return invalid(f"the call is not valid JSON{where}: {exc}")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return invalid('a call must be a JSON object with a string "name"')
    name = value["name"]
    if name not in names:
        return invalid(f"{name!r} is not one of the bound tools {list(names)}")
    args: Any = next((value[k] for k in _ARG_KEYS if k in value), {})
    if isinstance(args, str):  # OpenAI-style arguments: a JSON string holding the object
        if json_text_depth(args) > MAX_NESTING_DEPTH:
            return invalid(f"the arguments are nested more than {MAX_NESTING_DEPTH} levels deep")
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            return invalid(f"the arguments string is not valid JSON: {exc}")
    if not isinstance(args, dict):
        return invalid(f"the arguments must be a JSON object, not {type(args).__name__}")
    # An unclosed tag around a complete JSON object is still a whole call (a cut-off call is
    # never complete JSON, so it cannot get here).
    return tool_call(name=name, args=args, id=str(value.get("id") or make_id()))


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split into its text and its tool calls."""

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]


def parse_answer(text: str, names: Sequence[str], make_id: Callable[[], str] = _new_id) -> ParsedAnswer:
    """Split a whole answer into text, valid calls and invalid calls (never raises)."""
    splitter = ToolCallSplitter()
    events = [*splitter.feed(text), *splitter.finish()]
    content = "".join(e for e in events if isinstance(e, str))
    calls = [parse_raw_call(e, names, make_id) for e in events if isinstance(e, RawCall)]
    return ParsedAnswer(
        content=content,
        tool_calls=[c for c in calls if c.get("type") == "tool_call"],  # type: ignore[misc]
        invalid_tool_calls=[c for c in calls if c.get("type") == "invalid_tool_call"],  # type: ignore[misc]
    )


# --------------------------------------------------------------------------- structured output


def json_instruction(schema: Mapping[str, Any] | None, with_tools: bool = False) -> str:
    """The system instruction of JSON mode: one JSON object, matching `schema` when given.

    `with_tools`: tools are offered too, so the JSON object is the final answer,
    after any tool calls the model wants to make.
    """
    opening = (
        "Call tools as needed. When you give your final answer, it must be a single JSON object and nothing else."
        if with_tools
        else "Answer with a single JSON object and nothing else."
    )
    if schema is None:
        return opening
    return opening + " It must match this JSON schema:\n" + json.dumps(schema, ensure_ascii=False)


def raise_if_unsafe(message: BaseMessage) -> None:
    """`ModelRefusalError` when the answer was made under an unsafe verdict.

    Structured output is withheld then (its tool calls were blocked), so the
    parsers raise LangChain's refusal error rather than a parse error.
    """
    safety = message.response_metadata.get("safety") or {}
    if safety.get("verdict") == "unsafe":
        blocked = len(safety.get("blocked_tool_calls") or [])
        raise ModelRefusalError(
            f"Model refused to produce the requested output (category='unsafe'): the SafeCoDe judge "
            f"{safety.get('judge')!r} found the request unsafe in its visual context"
            + (f", so {blocked} tool call(s) were blocked" if blocked else ""),
            raw_message=message,
        )


def _message(result: list[Generation]) -> AIMessage:
    generation = result[0]
    if not isinstance(generation, ChatGeneration) or not isinstance(generation.message, AIMessage):
        raise OutputParserException("This parser reads the AIMessage of a chat model.")
    return generation.message


class ToolsAnswerParser(BaseGenerationOutputParser[Any]):
    """Structured output from the first tool call: unsafe -> `ModelRefusalError`; no call, an
    unreadable call or arguments that do not fit -> `OutputParserException`.

    `inner` (a `PydanticToolsParser` or `JsonOutputKeyToolsParser` with
    `first_tool_only=True`) validates the arguments.
    """

    inner: Any

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = _message(result)
        raise_if_unsafe(message)
        if not message.tool_calls:
            errors = message.response_metadata.get(INVALID_CALL_ERRORS) or {}
            reasons = [f"{c.get('name')!r}: {c.get('error') or errors.get(c.get('id'))}" for c in message.invalid_tool_calls]
            detail = f"its calls could not be read ({'; '.join(reasons)})" if reasons else "it made no tool call"
            raise OutputParserException(
                f"The model was asked for structured output but {detail}.",
                llm_output=str(message.content),
            )
        try:
            return self.inner.parse_result(result, partial=partial)
        except ValidationError as exc:  # one error type for every way structured output can fail
            raise OutputParserException(
                f"The {message.tool_calls[0]['name']!r} call's arguments do not fit the schema: {exc}",
                llm_output=json.dumps(message.tool_calls[0]["args"], ensure_ascii=False),
            ) from exc


class JsonAnswerParser(BaseGenerationOutputParser[Any]):
    """Structured output from a JSON answer: unsafe -> `ModelRefusalError`; else `inner` parses the text."""

    inner: Any

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = _message(result)
        raise_if_unsafe(message)
        if json_text_depth(message.text) > MAX_NESTING_DEPTH:  # json.loads would overflow the stack
            raise OutputParserException(
                f"The JSON answer is nested more than {MAX_NESTING_DEPTH} levels deep.", llm_output=message.text[:200]
            )
        return self.inner.parse_result(result, partial=partial)
