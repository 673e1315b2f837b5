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

Constrained decoding (`safecode_guard.constrained`, with llguidance
installed): a forced `tool_choice` opens the call and a grammar holds the
rest, so the tool's name is a bound tool's and its arguments validate against
that tool's schema; the call ends with `ToolTemplate.call_close`, read from the
template. Under `tool_choice="auto"` the model decides whether to call: the
text stays free until it opens a call, and from there the call is held to the
same grammar (`constrained.auto_call_constraint`); its calls are read and
validated afterwards as well (the parsers of `with_structured_output` validate too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.exceptions import ModelRefusalError, OutputParserException
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.messages.tool import InvalidToolCall, ToolCall
from langchain_core.output_parsers import BaseGenerationOutputParser
from langchain_core.outputs import ChatGeneration, Generation
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from ..errors import SafeCoDeError, UnsupportedContentError
from ..messages import MAX_NESTING_DEPTH, check_nesting, json_text_depth, nesting_depth
from ..tool_parsing import (
    CALL_CLOSE,
    CALL_OPEN,
    INVALID_CALL_ERRORS,
    PROBE_TOOL,
    RawCall,
    ToolCallSplitter,
    ToolChoice,
    ToolTemplate,
    checked_function_tool,
    forced_prefix,
    hf_tool_calls,
    json_instruction,
    new_call_id,
    normalize_tool_choice,
    parse_raw_call,
    probe_tool_template,
    tool_names,
)

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "INVALID_CALL_ERRORS",
    "PROBE_TOOL",
    "JsonAnswerParser",
    "ParsedAnswer",
    "RawCall",
    "StructuredOutputTruncatedError",
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
    "raise_if_truncated",
    "raise_if_unsafe",
    "tool_names",
]

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
        if not isinstance(schema, Mapping):
            raise UnsupportedContentError(f"tools[{i}] ({type(tool).__name__}) is not a function tool.")
        formatted.append(checked_function_tool(schema, i))
    return formatted


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer split into its text and its tool calls."""

    content: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]


def parse_answer(text: str, names: Sequence[str], make_id: Callable[[], str] = new_call_id) -> ParsedAnswer:
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
            raise_if_truncated(message, "its tool call")
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


class StructuredOutputTruncatedError(SafeCoDeError, OutputParserException):
    """The answer reached its token limit before its structured output was complete
    (`finish_reason="length"`): raise `max_tokens` / `max_new_tokens`."""


def raise_if_truncated(message: BaseMessage, what: str) -> None:
    """`StructuredOutputTruncatedError` when `message` ended at its token limit (its JSON is incomplete)."""
    if message.response_metadata.get("finish_reason") == "length":
        used = (getattr(message, "usage_metadata", None) or {}).get("output_tokens")
        raise StructuredOutputTruncatedError(
            f"The answer reached its token limit{f' ({used} tokens)' if used else ''} before {what} was complete "
            "(finish_reason='length'). Raise max_tokens / max_new_tokens, or ask for a smaller schema "
            "(bounded strings and arrays).",
            llm_output=message.text,
        )


class JsonAnswerParser(BaseGenerationOutputParser[Any]):
    """Structured output from a JSON answer: unsafe -> `ModelRefusalError`; else `inner` parses the text."""

    inner: Any

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        message = _message(result)
        raise_if_unsafe(message)
        raise_if_truncated(message, "its JSON")
        if json_text_depth(message.text) > MAX_NESTING_DEPTH:  # json.loads would overflow the stack
            raise OutputParserException(
                f"The JSON answer is nested more than {MAX_NESTING_DEPTH} levels deep.", llm_output=message.text[:200]
            )
        return self.inner.parse_result(result, partial=partial)
