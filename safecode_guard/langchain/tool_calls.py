"""Tool calling and JSON mode on the LangChain face: templates read from files, and `with_structured_output`.

The call's plan, the template probe and the answer reader live in
`safecode_guard.calls` (framework-neutral, shared with the HTTP server); they
are re-exported here."""

from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any

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
from . import tools as tools_mod

if TYPE_CHECKING:
    pass

# --------------------------------------------------------------------------- tools and JSON mode
#
# The plan of a call, the template probe and the answer reader are framework-neutral
# (`safecode_guard.calls`, shared with the HTTP server); LangChain's own parts follow.


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


def structured_output(
    chat: Any,
    schema: Mapping[str, Any] | type | None,
    *,
    include_raw: bool,
    method: str,
    strict: bool | None,
) -> Runnable[Any, Any]:
    """`ChatSafeCoDe.with_structured_output`: `chat` bound for `schema` (a forced tool call or JSON
    mode), piped into the parser that reads the answer (see that method's docstring)."""
    if schema is None and method != "json_mode":
        raise SafeCoDeInputError(
            f"with_structured_output(None, method={method!r}) needs a schema. Give a pydantic class, a TypedDict "
            "or a JSON schema, or use method='json_mode' for any JSON object."
        )
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
        if schema is None:  # JSON mode without a schema: any JSON object
            response_format: dict[str, Any] = {"type": "json_object"}
        else:  # JSON mode with a schema is decoded under the schema's grammar too: valid for it
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
