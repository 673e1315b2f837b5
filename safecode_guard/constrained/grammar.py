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

from ..errors import SafeCoDeInputError

__all__ = [
    "JSON_SEPARATORS",
    "Constraint",
    "auto_call_constraint",
    "call_close",
    "closed_objects",
    "ended_by_grammar",
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


def ended_by_grammar(min_tokens: int) -> SafeCoDeInputError:
    """The error for `min_tokens` on an answer that ends when its JSON is complete (it cannot hold)."""
    error = SafeCoDeInputError(
        f"`min_tokens` (={min_tokens}) cannot hold for a JSON answer (a JSON schema, JSON mode or a "
        "forced tool call): the answer ends as soon as its JSON is complete. Leave min_tokens out of "
        "this request (it applies to free text, including text under tool_choice=\"auto\")."
    )
    error.param = "min_tokens"
    return error


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


def _literal(text: str, tags: Mapping[str, int] | None = None) -> str:
    """`text` as a Lark fragment in which each of `tags` (a call tag -> the id of the tokenizer's own
    token for it) may be written either as that token or spelled out.

    llguidance treats a tokenizer's added tokens (Qwen's `<tool_call>`, `</tool_call>`) as special:
    a plain string literal could only be spelled byte by byte, never with the token a trained model
    writes. Empty `text`: an empty fragment."""
    if not text:
        return ""
    parts: list[str] = []
    rest = text
    while rest:
        at, tag = min(((i, t) for t in (tags or {}) if t and (i := rest.find(t)) >= 0), default=(-1, ""))
        if at < 0:
            parts.append(_lark_literal(rest))
            break
        if at:
            parts.append(_lark_literal(rest[:at]))
        parts.append(f"(<[{int((tags or {})[tag])}]> | {_lark_literal(tag)})")
        rest = rest[at + len(tag):]
    return " ".join(parts)


def _hex_regex(text: str) -> str:
    """`text` as a regex matching it literally (every character as `\\x{..}`: nothing is a metacharacter)."""
    return "".join(f"\\x{{{ord(c):X}}}" for c in text)


def tool_call_constraint(
    tools: Mapping[str, Mapping[str, Any]],
    *,
    name_to_args: str,
    call_close: str,
    named: str | None = None,
    tags: Mapping[str, int] | None = None,
) -> Constraint:
    """One tool call, written in the chat template's own layout, after the answer's forced opening.

    The caller opens the answer itself (`answer_prefix`): with the call's
    start and the tool's name when `named`, else with the call's start only.
    The grammar then holds the rest: the tool's name (one of `tools`, unless
    `named`), `name_to_args` (e.g. `'", "arguments": '`), the arguments as a
    JSON object valid for that tool's parameter schema, and `call_close`
    (e.g. `'}\\n</tool_call>'`). `tools` maps each name to its parameters'
    JSON schema (OpenAI's `function.parameters`); `tags` the call tags the
    tokenizer has as tokens of their own (see `_literal`).
    """
    if named is not None and named not in tools:
        raise ValueError(f"tool {named!r} is not one of the tools given ({', '.join(tools)})")
    return Constraint(f"start: {_call_rest(tools, name_to_args, call_close, named, tags)}\n", "tool_call")


def _call_rest(
    tools: Mapping[str, Mapping[str, Any]],
    name_to_args: str,
    call_close: str,
    named: str | None = None,
    tags: Mapping[str, int] | None = None,
) -> str:
    """A call after its opening, as a Lark rule body: a tool's name (unless `named`), the text up to
    its arguments, the arguments valid for that tool, the close."""
    if not tools:
        raise ValueError("a tool call constraint needs at least one tool")
    close = _literal(call_close, tags)
    if named is not None:
        return f"{_json_rule(_arguments(tools[named]))} {close}"
    calls = [
        f"{_lark_literal(name + name_to_args)} {_json_rule(_arguments(params))}"
        for name, params in tools.items()
    ]
    return "(" + " | ".join(calls) + f") {close}"


def auto_call_constraint(
    tools: Mapping[str, Mapping[str, Any]],
    *,
    call_open: str,
    name_to_args: str,
    call_close: str,
    marker: str | None,
    parallel: bool = True,
    tags: Mapping[str, int] | None = None,
) -> Constraint:
    """`tool_choice="auto"`: free text until the model opens a call, then the call's JSON under the
    tools' grammar (a bound tool's name, arguments valid for its schema), then free again.

    `marker` is the tag that opens a call inside running text (`<tool_call>` in the
    Hermes/Qwen layout): text is anything without it, and once the model writes
    it, `call_open` and the rest of a call follow; calls and text may alternate
    (one call only unless `parallel`). `marker=None` is a layout whose call is
    the whole answer (Llama 3.1's plain JSON, `call_open` `'{"name": "'`): the
    answer is then text that does not open with `{` or `[` (the answer reader
    takes those for calls), or one call. Special tokens never match text: the
    end token ends the answer once the grammar allows it.
    """
    call = f"{_literal(call_open, tags)} {_call_rest(tools, name_to_args, call_close, None, tags)}"
    if marker is None:
        return Constraint(
            "start: (TEXT | call)?\n"
            "TEXT: /(.|\\n)+/ & ~/[ \\t\\r\\n]*[\\[{](.|\\n)*/\n"
            f"call: {call}\n",
            "tool_call",
        )
    if not call_open.startswith(marker):
        raise ValueError(f"call_open ({call_open!r}) must start with the marker ({marker!r})")
    # Text is PLAIN runs without the marker's first character, and MARK runs from that character up to
    # its next occurrence that are not the marker: so the lexer can always end text where a call opens.
    first = _hex_regex(marker[0])
    calls = "(call text?)*" if parallel else "(call text?)?"
    return Constraint(
        f"start: text? {calls}\n"
        "text: (PLAIN | MARK)+\n"
        f"PLAIN: /[^{first}]+/\n"
        f"MARK: /{first}[^{first}]*/ & ~/{_hex_regex(marker)}(.|\\n)*/\n"
        f"call: {call}\n",
        "tool_call",
    )


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
    tags: Mapping[str, int] | None = None,
) -> Constraint | None:
    """The grammar of a forced tool call (`choice`: "any" or a tool name), or None when the template's
    call layout is unknown (the call is then opened but not constrained). "any" with one tool is that tool,
    as the answer's forced opening has it (`tools.forced_prefix`)."""
    if choice in ("auto", "none") or name_to_args is None or close is None:
        return None
    params = tool_parameters(tools)
    named = choice if choice != "any" else (next(iter(params)) if len(params) == 1 else None)
    return tool_call_constraint(params, name_to_args=name_to_args, call_close=close, named=named, tags=tags)
