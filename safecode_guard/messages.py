"""One reader of chat messages: the `Conversation` that the model's prompt and every judge view come from.

Input: Hugging Face chat messages (`{"role", "content"}`; content a string or
a list of `{"type": "text", "text"}` / `{"type": "image", "image"}` parts).
Tool turns follow the transformers convention: an assistant message may carry
`tool_calls` (`[{"type": "function", "id", "function": {"name", "arguments": dict}}]`)
and a `{"role": "tool", "content", "tool_call_id", "name"}` message answers one call.

Output: a `Conversation`, everything the model is given for one request:

- `messages`: the validated messages (images as PIL, consecutive same-role
  turns merged): what the chat template renders;
- `turns`: the same messages as judges read them (`Turn`: text runs, images,
  tool calls as canonical JSON, tool name and call id);
- `tools` and `answer_prefix`: the tool definitions the template is given
  and the forced opening of the answer; `response_schema`: a JSON schema the
  answer is held to;
- `joins`: how the model's chat template joins each message's content parts
  (the engine reads it from its template, `prompting.template_joins`;
  without it parts are concatenated, as most templates do).

`prompting.render_prompt` renders the model's prompt from it and
`judges.JudgeRequest.from_conversation` makes the judge's request from it, so
the two cannot drift apart. `parse_messages` reads a request for the model
(images decoded under an `InputPolicy`); `read_turns` reads a conversation
for a judge (images already PIL, any role, LangChain-shaped tool calls too).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from PIL import Image

from .config import InputPolicy
from .control import checkpoint
from .errors import InputLimitError, UnsupportedContentError
from .images import load_images

__all__ = [
    "MAX_NESTING_DEPTH",
    "ROLES",
    "Conversation",
    "Turn",
    "canonical_json",
    "check_counts",
    "check_nesting",
    "checked_json",
    "checked_prefix",
    "checked_schema",
    "checked_tools",
    "count_parts",
    "json_text_depth",
    "nesting_depth",
    "parse_messages",
    "read_turns",
]

ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
_IMAGE_KEYS = ("image", "url", "path", "base64", "image_url")

#: Deepest nesting of lists and dicts accepted in what reaches a chat template or a judge
#: as structure (tool-call arguments, tool schemas, response schemas). Every walk over such
#: values (ours, JSON encoding, Jinja's `tojson`) recurses once per level; real arguments and
#: schemas stay far below this, and a request nested deeper gets `InputLimitError`, not a
#: `RecursionError` from deep inside a library.
MAX_NESTING_DEPTH = 64


# --------------------------------------------------------------------------- what judges read


@dataclass(frozen=True)
class Turn:
    """One message of a conversation as a judge reads it (see `Conversation.turns`)."""

    role: str
    """"system", "user", "assistant" or "tool"."""
    parts: tuple[str | Image.Image, ...]
    """Text and PIL images in message order; adjacent text parts are one run, joined as the
    model's chat template joins them."""
    tool_calls: tuple[tuple[str, str, str], ...] = ()
    """Assistant tool calls as `(id, name, arguments as canonical JSON)`."""
    tool_name: str | None = None
    """For a tool result: the tool that produced it."""
    tool_call_id: str | None = None
    """For a tool result: the call it answers."""

    @property
    def text(self) -> str:
        """The text of the message as the model reads it, images left out."""
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> tuple[Image.Image, ...]:
        return tuple(p for p in self.parts if isinstance(p, Image.Image))


def _runs(parts: Sequence[str | Image.Image], joins: Sequence[str] | None) -> tuple[str | Image.Image, ...]:
    """`parts` with every run of text joined as the template joins it (`joins[k]` sits between
    parts k and k+1; None: nothing). The text the template writes between a text part and an
    image goes with the text, so no character of it is lost."""
    out: list[str | Image.Image] = []
    for k, part in enumerate(parts):
        glue = joins[k - 1] if joins is not None and k > 0 and k - 1 < len(joins) else ""
        if isinstance(part, str):
            if out and isinstance(out[-1], str):
                out[-1] = out[-1] + glue + part
            else:
                out.append(glue + part if out else part)
        else:
            if glue and out and isinstance(out[-1], str):
                out[-1] = out[-1] + glue
            out.append(part)
    return tuple(out)


# --------------------------------------------------------------------------- the conversation


@dataclass(frozen=True)
class Conversation:
    """Everything the model is given for one request (see the module docstring)."""

    messages: tuple[dict[str, Any], ...]
    """The validated messages, images as PIL: what the chat template renders."""
    images: tuple[Image.Image, ...]
    """Every image, in message order."""
    tools: tuple[dict[str, Any], ...] = ()
    """Tool definitions (OpenAI-format function schemas) given to the chat template's `tools=`."""
    response_schema: dict[str, Any] | None = None
    """A JSON schema the answer is held to, if any."""
    answer_prefix: str = ""
    """Text the answer is forced to open with (appended to the prompt)."""
    joins: tuple[tuple[str, ...], ...] | None = None
    """Per message, the text the chat template writes between consecutive content parts;
    None when no template was asked (parts are then concatenated)."""

    @cached_property
    def turns(self) -> tuple[Turn, ...]:
        """The messages as judges read them, text parts joined as `joins` says."""
        return tuple(
            _turn(m, self.joins[i] if self.joins is not None and i < len(self.joins) else None)
            for i, m in enumerate(self.messages)
        )

    @property
    def request(self) -> str:
        """Text of the latest user turn (stripped), as the model reads it."""
        return next((t.text.strip() for t in reversed(self.turns) if t.role == "user"), "")

    def with_request(
        self,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
        response_schema: Mapping[str, Any] | None = None,
    ) -> Conversation:
        """This conversation with what else one call gives the model: tools, an answer opening, a schema.

        Each is checked (`checked_tools`, `checked_schema`, `checked_prefix`); a bad value
        raises a typed error.
        """
        return dataclasses.replace(
            self,
            tools=checked_tools(tools),
            answer_prefix=checked_prefix(answer_prefix),
            response_schema=checked_schema(response_schema),
        )

    def with_joins(self, joins: Sequence[Sequence[str]] | None) -> Conversation:
        """This conversation with the chat template's joins (`prompting.template_joins`)."""
        return dataclasses.replace(self, joins=None if joins is None else tuple(tuple(j) for j in joins))

    def judged_messages(self) -> tuple[dict[str, Any], ...]:
        """The messages as a judge reads them: each run of text one part, joined as the template joins it."""
        out = []
        for m, turn in zip(self.messages, self.turns, strict=True):
            content = [
                {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p}
                for p in turn.parts
            ]
            out.append({**m, "content": content})
        return tuple(out)


def checked_tools(tools: Sequence[Mapping[str, Any]] | None) -> tuple[dict[str, Any], ...]:
    """`tools` as a tuple of dicts, each bounded in depth (`InputLimitError`) and JSON-encodable."""
    if not tools:
        return ()
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise UnsupportedContentError(
            f"`tools` must be a list of tool schemas, got a {type(tools).__name__}. "
            'Give e.g. [{"type": "function", "function": {"name": ..., "parameters": {...}}}].'
        )
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise UnsupportedContentError(
                f"tools[{i}] is a {type(tool).__name__}; a tool is a dict like "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}.'
            )
        out.append(checked_json(tool, f"tools[{i}]"))
    return tuple(out)


def checked_schema(schema: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A response schema as a JSON-safe dict (`checked_json`), or None."""
    if schema is None:
        return None
    if not isinstance(schema, Mapping):
        raise UnsupportedContentError(f"`response_schema` is a {type(schema).__name__}; give a JSON schema as a dict.")
    return checked_json(schema, "response_schema")


def checked_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise UnsupportedContentError(f"`answer_prefix` is a {type(prefix).__name__}; give the answer's opening as a string.")
    return prefix


def checked_json(value: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A copy of `value` (dicts, lists, strings, numbers), nested at most `MAX_NESTING_DEPTH` levels.

    Raises `InputLimitError` when it is nested deeper and `UnsupportedContentError`
    when it holds something JSON cannot write (so a judge can show it as JSON).
    """
    check_nesting(value, where)
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedContentError(f"{where} cannot be written as JSON: {exc}. Use dicts, lists, strings and numbers.") from exc
    return json.loads(json.dumps(value, ensure_ascii=False))


def nesting_depth(value: Any, limit: int = MAX_NESTING_DEPTH) -> int:
    """How deeply `value` nests dicts, lists and tuples (a scalar is 0, `{"a": [1]}` is 2).

    Iterative, so it cannot overflow the stack itself, and it stops counting
    once past `limit` (the answer is then `limit + 1`).
    """
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > limit:
            return depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


def check_nesting(value: Any, where: str) -> None:
    """`InputLimitError` when `value` nests deeper than `MAX_NESTING_DEPTH`."""
    if nesting_depth(value) > MAX_NESTING_DEPTH:
        raise InputLimitError(
            f"{where} is nested more than {MAX_NESTING_DEPTH} levels deep. Flatten the structure "
            "(tool arguments and schemas rarely need more than a few levels)."
        )


def json_text_depth(text: str) -> int:
    """The deepest bracket nesting of JSON `text`, brackets inside strings not counted.

    Read before `json.loads`, whose C parser recurses per level and raises
    `RecursionError` (not a decode error) on very deep input.
    """
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def canonical_json(value: Any) -> str:
    """`value` as JSON with sorted keys: the same value always reads (and fingerprints) the same way."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)


# --------------------------------------------------------------------------- reading one message


def _image_value(part: Mapping[str, Any]) -> Any:
    for key in _IMAGE_KEYS:
        value = part.get(key)
        if value is not None:
            if key == "image_url" and isinstance(value, Mapping):
                value = value.get("url")
            return value
    raise UnsupportedContentError(
        f"An image part has no image data (keys: {sorted(part)}). "
        'Use {"type": "image", "image": <PIL.Image | bytes | data URL>}.'
    )


def _read_part(part: Any, where: str, *, pil_only: bool) -> dict[str, Any]:
    """One content part, validated; an image part keeps its value (decoded later, all together),
    which must already be a PIL image when `pil_only`."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise UnsupportedContentError(
            f"{where} is a {type(part).__name__}; content parts must be dicts like "
            '{"type": "text", "text": "..."} or {"type": "image", "image": ...}.'
        )
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise UnsupportedContentError(f'{where} is a text part whose "text" is not a string.')
        return {"type": "text", "text": text}
    if kind in ("image", "image_url"):
        value = _image_value(part)
        if pil_only and not isinstance(value, Image.Image):
            raise UnsupportedContentError(
                f"{where} holds a {type(value).__name__} image; the judge needs PIL "
                "images. Load it first with `safecode_guard.images.load_image(value, policy)`."
            )
        return {"type": "image", "image": value}
    raise UnsupportedContentError(
        f"{where} has type {kind!r}, which this model cannot read. "
        'Supported content parts: "text" and "image".'
    )


def _read_content(content: Any, where: str, *, pil_only: bool) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, (bytes, bytearray)) or not isinstance(content, Sequence):
        raise UnsupportedContentError(
            f"{where}.content is a {type(content).__name__}; use a string or a list of parts."
        )
    return [_read_part(p, f"{where}.content[{j}]", pil_only=pil_only) for j, p in enumerate(content)]


def _role(message: Any, where: str) -> str:
    if not isinstance(message, Mapping):
        raise UnsupportedContentError(
            f"{where} is a {type(message).__name__} {message!r:.80}; each message must be "
            'a dict like {"role": "user", "content": "..."}.'
        )
    role = message.get("role")
    if role not in ROLES:
        raise UnsupportedContentError(f"{where} has role {role!r}; use one of {list(ROLES)}.")
    return role


_CALL_SHAPE = '{"type": "function", "id": ..., "function": {"name": str, "arguments": dict}}'


def _tool_fields(message: Mapping[str, Any], role: str, where: str, *, lenient: bool) -> dict[str, Any]:
    """The tool-calling fields of one message: `tool_calls` (assistant), `tool_call_id` / `name` (tool).

    Calls come out in the transformers shape the chat template reads. `lenient` (judge
    input) also takes LangChain-shaped calls (`name`, `args`) and JSON-string arguments.
    """
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if isinstance(calls, (str, bytes)) or not isinstance(calls, Sequence):
            raise UnsupportedContentError(f"{where}.tool_calls must be a list of {_CALL_SHAPE}.")
        return {"tool_calls": [_read_call(c, f"{where}.tool_calls[{j}]", lenient) for j, c in enumerate(calls)]}
    if role == "tool":
        return {k: str(message[k]) for k in ("tool_call_id", "name") if message.get(k) is not None}
    return {}


def _read_call(call: Any, where: str, lenient: bool) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    source = function if isinstance(function, Mapping) else (call if lenient else None)
    name = source.get("name") if isinstance(source, Mapping) else None
    args = source.get("arguments", source.get("args", {}) if lenient else None) if isinstance(source, Mapping) else None
    ok_args = isinstance(args, Mapping) or (lenient and isinstance(args, str))
    if not isinstance(name, str) or not ok_args:
        raise UnsupportedContentError(f"{where} must look like {_CALL_SHAPE}.")
    if not lenient:
        return dict(call)
    return {"type": "function", "id": str(call.get("id") or ""), "function": {"name": name, "arguments": args}}


def _turn(message: Mapping[str, Any], joins: Sequence[str] | None) -> Turn:
    """A validated message (images PIL) as a `Turn`."""
    parts = [p["text"] if p["type"] == "text" else p["image"] for p in message["content"]]
    calls = tuple(
        (
            str(c.get("id") or ""),
            c["function"]["name"],
            a if isinstance(a := c["function"]["arguments"], str) else canonical_json(a),
        )
        for c in message.get("tool_calls") or ()
    )
    tool = message["role"] == "tool"
    return Turn(
        role=message["role"],
        parts=_runs(parts, joins),
        tool_calls=calls,
        tool_name=message.get("name") if tool else None,
        tool_call_id=message.get("tool_call_id") if tool else None,
    )


# --------------------------------------------------------------------------- the two readers


def _check_list(messages: Any, name: str) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UnsupportedContentError(
            f"`{name}` must be a list of chat messages, got {type(messages).__name__}. "
            'Use [{"role": "user", "content": "..."}].'
        )


def read_turns(messages: Sequence[Mapping[str, Any]], where: str = "messages") -> tuple[Turn, ...]:
    """A conversation as a judge reads it: every message a `Turn`, images already PIL.

    Any role may hold images (a judge reads what another provider's model was
    sent); tool calls may be transformers- or LangChain-shaped; consecutive
    turns stay apart. A typed error names what cannot be read.
    """
    _check_list(messages, where)
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}[{i}]"
        role = _role(message, at)
        content = _read_content(message.get("content"), at, pil_only=True)
        turns.append(_turn({"role": role, "content": content, **_tool_fields(message, role, at, lenient=True)}, None))
    return tuple(turns)


def count_parts(content: Any) -> int:
    """Content parts of one message's `content`: a list's length, 1 for anything else (a string)."""
    if isinstance(content, (str, bytes, bytearray)) or not isinstance(content, Sequence):
        return 1
    return len(content)


def check_counts(messages: Sequence[Any], policy: InputPolicy, parts_of: Any = None) -> None:
    """Refuse a conversation over `policy.max_messages` or `policy.max_content_parts` before any
    message is read (`InputLimitError` naming the limit). `parts_of(message)` gives a message's
    content (default: `message.get("content")` for dicts, `message.content` for objects)."""
    if len(messages) > policy.max_messages:
        raise InputLimitError(
            f"The conversation holds {len(messages)} messages; the limit is {policy.max_messages} "
            "(InputPolicy.max_messages). Send fewer messages (e.g. summarise older turns), or raise the limit."
        )
    total = 0
    for message in messages:
        if parts_of is not None:
            content = parts_of(message)
        elif isinstance(message, Mapping):
            content = message.get("content")
        else:
            content = getattr(message, "content", None)
        total += count_parts(content)
        if total > policy.max_content_parts:
            raise InputLimitError(
                f"The conversation holds more than {policy.max_content_parts} content parts "
                "(InputPolicy.max_content_parts). Send fewer text or image blocks, or raise the limit."
            )


def parse_messages(
    messages: Sequence[Mapping[str, Any]], policy: InputPolicy, *, max_side: int | None = None
) -> Conversation:
    """Validate `messages` for the model, decode their images, merge consecutive same-role turns.

    Every message is validated and every image counted (with the request's
    total bytes and declared pixels, `images.load_images`) before any image is
    decoded. Images come back RGB with their longer side at most `max_side`
    (and `policy.max_working_side`): pass `images.image_working_side(processor, policy)`.
    """
    _check_list(messages, "messages")
    if not messages:
        raise UnsupportedContentError('`messages` is empty. Give at least one {"role": "user", ...} message.')
    check_counts(messages, policy)
    parsed: list[dict[str, Any]] = []
    image_parts: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        checkpoint()  # a cancelled request (e.g. its client left) stops here
        at = f"messages[{i}]"
        role = _role(message, at)
        content = message.get("content")
        if content is None:
            raise UnsupportedContentError(f"{at}.content is a NoneType; use a string or a list of parts.")
        parts = _read_content(content, at, pil_only=False)
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise UnsupportedContentError(f"{at} ({role}) holds an image; only user turns may carry images.")
        image_parts.extend(p for p in parts if p["type"] == "image")
        extras = _tool_fields(message, role, at, lenient=False)
        if parsed and parsed[-1]["role"] == role and role != "tool" and not extras and len(parsed[-1]) == 2:
            # Many chat templates insist on alternating roles; two turns in a row are one turn.
            # (Tool results and tool-calling turns stay apart: each answers or makes its own calls.)
            # Extended in place: merging stays linear in the number of messages.
            parsed[-1]["content"].append({"type": "text", "text": "\n"})
            parsed[-1]["content"].extend(parts)
        else:
            parsed.append({"role": role, "content": parts, **extras})
    if parsed[-1]["role"] == "assistant":
        raise UnsupportedContentError(
            "The last message is an assistant turn; end with a user turn for the model to answer."
        )
    images = load_images([p["image"] for p in image_parts], policy, max_side=max_side)
    for part, image in zip(image_parts, images, strict=True):
        part["image"] = image
    return Conversation(messages=tuple(parsed), images=tuple(images))

