"""Tool calling and JSON mode for one call: the plan, the template probe, and the answer reader."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.messages.tool import ToolCallChunk, invalid_tool_call, tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
)
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass

from ..engine.loading import chat_template_source
from ..errors import SafeCoDeInputError, UnsupportedModelError
from ..prompting import render_prompt
from . import tools as tools_mod

if TYPE_CHECKING:
    from ..engine.core import SafeCoDe

# --------------------------------------------------------------------------- tools and JSON mode


@dataclass(frozen=True)
class CallPlan:
    """How one call uses tools or JSON mode: what the prompt gets and how the answer is read."""

    names: tuple[str, ...] | None = None
    """The bound tools' names; None when no tools are bound (no tool parsing, no `blocked_tool_calls`)."""
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

    probed = tools_mod.probe_tool_template(render, repr(engine.model_name))
    with _TEMPLATES_LOCK:
        _TEMPLATES[engine] = (key, probed)
    return probed


def tool_calling_from_files(model: str) -> bool | None:
    """Whether `model`'s chat template takes tools, read from its files without loading anything.

    The template found on disk (`loading.chat_template_source`) goes through the
    same probe as a loaded one (`tools.probe_tool_template`), rendered by
    transformers' own template engine. None when no template is found here.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        template = chat_template_source(model)
    except Exception:  # an unreadable folder or cache entry: unknown here; loading reports it
        return None
    if isinstance(template, list):  # a tokenizer's named templates: transformers takes "tool_use" for tools
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("tool_use") or named.get("default")
    if not isinstance(template, str):
        return None

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool) -> str:
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=gen)
        return rendered[0]

    try:
        tools_mod.probe_tool_template(render, repr(model))
    except UnsupportedModelError:
        return False
    return True


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
            tools_mod.check_nesting(schema, "The `response_format` schema")
            return dict(schema)
    raise SafeCoDeInputError(
        f"`response_format` (={response_format!r}) must be {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}. Or use with_structured_output(schema)."
    )


@dataclass
class AnswerReader:
    """Reads an answer's text under a `CallPlan` into `(text, tool_call_chunks)` pairs.

    The pairs become the stream's chunks, and `invoke` merges those same chunks,
    so both paths read an answer identically by construction. A valid call is
    one chunk whose `args` is its arguments as a JSON object. An invalid call
    (malformed, unknown tool, cut off, or a second call under
    `parallel_tool_calls=False`) is one chunk whose `args` is the call's raw
    text as a JSON *string*: LangChain's chunk merging repairs truncated JSON
    objects (`{"a": 1` -> `{"a": 1}`), which would make a cut-off call
    runnable, while a string always stays an invalid call. `json.loads(args)`
    gives back what the model wrote; the reason is kept in `errors` (merging
    drops `InvalidToolCall.error`). Calls made under an unsafe verdict go to
    `blocked` instead, as parsed (`ToolCall` or `InvalidToolCall` dicts).
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

    def feed(self, text: str) -> list[tuple[str, list[ToolCallChunk]]]:
        events = self._splitter.feed(text) if self._splitter else ([text] if text else [])
        return self._convert(events)

    def finish(self) -> list[tuple[str, list[ToolCallChunk]]]:
        return self._convert(self._splitter.finish()) if self._splitter else []

    def _convert(self, events: list[tools_mod.Event]) -> list[tuple[str, list[ToolCallChunk]]]:
        out: list[tuple[str, list[ToolCallChunk]]] = []
        for event in events:
            if isinstance(event, str):
                out.append((event, []))
                continue
            assert self.plan is not None and self.plan.names is not None
            call: Any = tools_mod.parse_raw_call(event, self.plan.names)
            if self.unsafe:
                self.blocked.append(dict(call))  # an unsafe scene must not trigger actions
                continue
            if call["type"] == "tool_call" and self.valid_calls and not self.plan.parallel:
                call = invalid_tool_call(
                    name=call["name"], args=json.dumps(call["args"], ensure_ascii=False), id=call["id"],
                    error="parallel_tool_calls=False: only the first tool call is kept",
                )
            index, self.calls = self.calls, self.calls + 1
            if call["type"] == "tool_call":
                self.valid_calls += 1
                args = json.dumps(call["args"], ensure_ascii=False)
            else:
                self.errors[call["id"]] = call["error"]
                args = json.dumps(call["args"], ensure_ascii=False)  # the raw text, as a JSON string
            out.append(("", [tool_call_chunk(name=call["name"], args=args, id=call["id"], index=index)]))
        return out


def structured_output(
    chat: Any,
    schema: Mapping[str, Any] | type,
    *,
    include_raw: bool,
    method: str,
    strict: bool | None,
) -> Runnable[Any, Any]:
    """`ChatSafeCoDe.with_structured_output`: `chat` bound for `schema` (a forced tool call or JSON
    mode), piped into the parser that reads the answer (see that method's docstring)."""
    if isinstance(schema, Mapping):
        tools_mod.check_nesting(schema, "The structured-output schema")
    is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
    trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
    if method == "function_calling":
        name = convert_to_openai_tool(schema)["function"]["name"]
        llm: Runnable[Any, Any] = chat.bind_tools([schema], tool_choice=name, strict=strict, **trace)
        inner = (
            PydanticToolsParser(tools=[schema], first_tool_only=True)
            if is_pydantic
            else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        )
        parser: Runnable[Any, Any] = tools_mod.ToolsAnswerParser(inner=inner)
    elif method in ("json_schema", "json_mode"):
        if method == "json_mode":
            response_format: dict[str, Any] = {"type": "json_object"}
        else:
            response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
        llm = chat.bind(response_format=response_format, **trace)
        inner = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        parser = tools_mod.JsonAnswerParser(inner=inner)
    else:
        raise SafeCoDeInputError(
            f"`method` (={method!r}) must be 'function_calling', 'json_schema' or 'json_mode'."
        )
    if not include_raw:
        return llm | parser
    parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
    keep_raw = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=llm) | parse.with_fallbacks([keep_raw], exception_key="parsing_error")
