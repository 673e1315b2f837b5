"""What a constrained answer may look like, as llguidance grammar text: small pure functions.

Every constraint is a Lark grammar in llguidance's dialect, whose `%json{...}`
rule embeds a JSON schema. Building the text needs no tokenizer and no
llguidance; compiling it against a tokenizer is `matcher.GrammarCompiler`'s job.

Whitespace policy (issue 20, item 5): the JSON a constrained answer holds has
no free whitespace. Separators are fixed to `", "` and `": "` (what Python's
`json.dumps` and the chat templates' `tojson` write, so a model reads and
writes the layout it was trained on), and nothing else may sit between
tokens, so a model cannot pad an answer with endless spaces or newlines and a
finite schema (booleans, enums, bounded strings and arrays) always ends.
The policy overrides any `x-guidance` options a schema carries.

Closed objects: an object schema that lists its `properties` and says nothing
about others gets `additionalProperties: false` (`closed_objects`), as OpenAI's
strict mode requires. JSON Schema's default (any other key allowed) would let a
model add keys without end; a Pydantic model's schema never means that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "JSON_SEPARATORS",
    "Constraint",
    "call_close",
    "closed_objects",
    "forced_call_constraint",
    "json_object_constraint",
    "json_schema_constraint",
    "tool_call_constraint",
    "tool_parameters",
]

#: The separators between items and between a key and its value: `json.dumps`' defaults.
JSON_SEPARATORS = (", ", ": ")

#: llguidance's JSON options for the policy above (applied to every embedded schema).
_NO_FREE_WHITESPACE = {
    "whitespace_flexible": False,
    "item_separator": JSON_SEPARATORS[0],
    "key_separator": JSON_SEPARATORS[1],
}

ConstraintKind = Literal["json_schema", "json_object", "tool_call"]


@dataclass(frozen=True)
class Constraint:
    """A grammar the answer must follow (after any `answer_prefix`), and what it was made from.

    `grammar` is llguidance grammar text (compiled once per tokenizer and
    cached by it); `kind` names the source for messages and metrics. Build
    one with `json_schema_constraint`, `json_object_constraint` or
    `tool_call_constraint`.
    """

    grammar: str
    kind: ConstraintKind


def _lark_literal(text: str) -> str:
    """`text` as a Lark string literal (JSON string escapes are Lark's too)."""
    return json.dumps(text, ensure_ascii=False)


#: Keywords whose value is one subschema, and those whose value is a list or a name -> subschema map.
_ONE_SCHEMA = ("items", "additionalItems", "additionalProperties", "not", "if", "then", "else",
               "contains", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on each object schema that lists `properties` and
    says nothing about other keys (no `additionalProperties`, `patternProperties` or
    `unevaluatedProperties`). A new value; `schema` is not changed."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = dict(schema)
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), (Mapping, list)):
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SCHEMA_MAP:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(out.get("properties"), Mapping) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _json_rule(schema: Mapping[str, Any]) -> str:
    """An embedded `%json{...}` rule for `schema`: objects closed, under the whitespace policy."""
    if not isinstance(schema, Mapping):
        raise TypeError(f"a JSON schema must be a mapping; got a {type(schema).__name__}")
    guidance = {**dict(schema.get("x-guidance") or {}), **_NO_FREE_WHITESPACE}
    closed = closed_objects(schema)
    return "%json" + json.dumps({**closed, "x-guidance": guidance}, ensure_ascii=False)


def json_schema_constraint(schema: Mapping[str, Any]) -> Constraint:
    """The answer is one JSON value valid for `schema` (OpenAI's `response_format` json_schema)."""
    return Constraint(f"start: {_json_rule(schema)}\n", "json_schema")


def json_object_constraint() -> Constraint:
    """The answer is one JSON object, any keys (OpenAI's `response_format` json_object, JSON mode)."""
    return Constraint(f"start: {_json_rule({'type': 'object'})}\n", "json_object")


def tool_call_constraint(
    tools: Mapping[str, Mapping[str, Any]],
    *,
    name_to_args: str,
    call_close: str,
    named: str | None = None,
) -> Constraint:
    """One tool call, written in the chat template's own layout, after the answer's forced opening.

    The caller opens the answer itself (`answer_prefix`): with the call's
    start and the tool's name when `named`, else with the call's start only.
    The grammar then holds the rest: the tool's name (one of `tools`, unless
    `named`), `name_to_args` (e.g. `'", "arguments": '`), the arguments as a
    JSON object valid for that tool's parameter schema, and `call_close`
    (e.g. `'}\\n</tool_call>'`). `tools` maps each name to its parameters'
    JSON schema (OpenAI's `function.parameters`).
    """
    if not tools:
        raise ValueError("a tool call constraint needs at least one tool")
    if named is not None and named not in tools:
        raise ValueError(f"tool {named!r} is not one of the tools given ({', '.join(tools)})")
    close = _lark_literal(call_close) if call_close else ""
    if named is not None:
        return Constraint(f"start: {_json_rule(_arguments(tools[named]))} {close}\n", "tool_call")
    calls = [
        f"{_lark_literal(name + name_to_args)} {_json_rule(_arguments(params))}"
        for name, params in tools.items()
    ]
    return Constraint("start: (" + " | ".join(calls) + f") {close}\n", "tool_call")


def _arguments(params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A tool's arguments are always a JSON object, even when its schema says less (or nothing)."""
    if not params:
        return {"type": "object"}
    return params if "type" in params else {**params, "type": "object"}


def tool_parameters(tools: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """OpenAI-format tools (`{"type": "function", "function": {...}}`) -> name: parameters schema."""
    out: dict[str, Mapping[str, Any]] = {}
    for tool in tools:
        fn = tool.get("function", tool)
        out[str(fn["name"])] = fn.get("parameters") or {"type": "object"}
    return out


def call_close(turn: str, args_at: int, specials: Sequence[str] = (), turn_end: str = "") -> str | None:
    """The text that ends a tool call in a rendered assistant turn, after the arguments' JSON.

    `turn` is a call rendered by the chat template, its arguments' JSON object
    starting at `args_at`. The close runs from the end of that object to the
    end of the turn: `turn_end` (what the template writes after any assistant
    reply, e.g. `'<|im_end|>\\n'`) is cut off the end, and so is everything from
    the first special token on (the end-of-turn token ends the answer by
    itself); trailing whitespace is dropped. `'}\\n</tool_call>'` for Qwen, `'}'`
    for Llama 3.1. None when the arguments are not JSON there.
    """
    try:
        _, end = json.JSONDecoder().raw_decode(turn, args_at)
    except ValueError:
        return None
    rest = turn[end:]
    if turn_end.strip() and rest.endswith(turn_end):
        rest = rest[: -len(turn_end)]
    cut = min((i for s in specials if s and (i := rest.find(s)) >= 0), default=len(rest))
    return rest[:cut].rstrip()


def forced_call_constraint(
    tools: Sequence[Mapping[str, Any]],
    choice: str,
    *,
    name_to_args: str | None,
    close: str | None,
) -> Constraint | None:
    """The grammar of a forced tool call (`choice`: "any" or a tool name), or None when the template's
    call layout is unknown (the call is then opened but not constrained). "any" with one tool is that tool,
    as the answer's forced opening has it (`tools.forced_prefix`)."""
    if choice in ("auto", "none") or name_to_args is None or close is None:
        return None
    params = tool_parameters(tools)
    named = choice if choice != "any" else (next(iter(params)) if len(params) == 1 else None)
    return tool_call_constraint(params, name_to_args=name_to_args, call_close=close, named=named)
