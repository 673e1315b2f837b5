"""From chat messages to a prompt string and the request's images.

Input: Hugging Face chat messages (`{"role", "content"}`; content a string or
a list of `{"type": "text", "text"}` / `{"type": "image", "image"}` parts).
Tool turns follow the transformers convention: an assistant message may carry
`tool_calls` (`[{"type": "function", "id", "function": {"name", "arguments": dict}}]`)
and a `{"role": "tool", "content", "tool_call_id", "name"}` message answers one call.
Output: a `Conversation` holding validated messages with PIL images, the
images in message order, and the text of the latest user turn. Rendering to
a prompt string uses the processor's own chat template (with `tools=` when
the request offers tools).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .config import InputPolicy
from .control import checkpoint
from .errors import InputLimitError, UnsupportedContentError, UnsupportedModelError

__all__ = ["Conversation", "check_counts", "count_parts", "neutralize_special_tokens", "parse_messages", "render_prompt"]

ROLES = ("system", "user", "assistant", "tool")
_IMAGE_KEYS = ("image", "url", "path", "base64", "image_url")


@dataclass(frozen=True)
class Conversation:
    """Validated messages (images as PIL), the images in order, the latest user text."""

    messages: tuple[dict[str, Any], ...]
    images: tuple[Image.Image, ...]
    request: str


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


def _parse_part(part: Any, where: str) -> dict[str, Any]:
    """One content part, validated; an image part keeps its raw value (decoded later, all together)."""
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
        return {"type": "image", "image": _image_value(part)}
    raise UnsupportedContentError(
        f"{where} has type {kind!r}, which this model cannot read. "
        'Supported content parts: "text" and "image".'
    )


def _tool_fields(message: Mapping[str, Any], role: str, where: str) -> dict[str, Any]:
    """The tool-calling fields of one message: `tool_calls` (assistant), `tool_call_id` / `name` (tool)."""
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        ok = isinstance(calls, Sequence) and not isinstance(calls, (str, bytes)) and all(
            isinstance(c, Mapping)
            and isinstance(c.get("function"), Mapping)
            and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments"), Mapping)
            for c in calls
        )
        if not ok:
            raise UnsupportedContentError(
                f"{where}.tool_calls must be a list of "
                '{"type": "function", "id": ..., "function": {"name": str, "arguments": dict}}.'
            )
        return {"tool_calls": [dict(c) for c in calls]}
    if role == "tool":
        return {k: str(message[k]) for k in ("tool_call_id", "name") if message.get(k) is not None}
    return {}


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
    """Validate `messages`, decode their images, merge consecutive same-role turns.

    Every message is validated and every image counted (with the request's
    total bytes and declared pixels, `images.load_images`) before any image is
    decoded. Images come back RGB with their longer side at most `max_side`
    (and `policy.max_working_side`): pass `images.image_working_side(processor, policy)`.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UnsupportedContentError(
            f"`messages` must be a list of chat messages, got {type(messages).__name__}. "
            'Use [{"role": "user", "content": "..."}].'
        )
    if not messages:
        raise UnsupportedContentError('`messages` is empty. Give at least one {"role": "user", ...} message.')
    check_counts(messages, policy)
    parsed: list[dict[str, Any]] = []
    image_parts: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        checkpoint()  # a cancelled request (e.g. its client left) stops here
        if not isinstance(message, Mapping):
            raise UnsupportedContentError(f"messages[{i}] is a {type(message).__name__}, not a dict with role and content.")
        role = message.get("role")
        if role not in ROLES:
            raise UnsupportedContentError(f"messages[{i}] has role {role!r}; use one of {list(ROLES)}.")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            parts = [_parse_part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(content)]
        else:
            raise UnsupportedContentError(
                f"messages[{i}].content is a {type(content).__name__}; use a string or a list of parts."
            )
        if role != "user" and any(p["type"] == "image" for p in parts):
            raise UnsupportedContentError(
                f"messages[{i}] ({role}) holds an image; only user turns may carry images."
            )
        image_parts.extend(p for p in parts if p["type"] == "image")
        extras = _tool_fields(message, role, f"messages[{i}]")
        if parsed and parsed[-1]["role"] == role and role != "tool" and not extras and len(parsed[-1]) == 2:
            # Many chat templates insist on alternating roles; two turns in a row are one turn.
            # (Tool results and tool-calling turns stay apart: each answers or makes its own calls.)
            # Extended in place (`parts` is this call's own list): linear in the messages, never a copy per turn.
            parsed[-1]["content"].extend([{"type": "text", "text": "\n"}, *parts])
        else:
            parsed.append({"role": role, "content": parts, **extras})
    if parsed[-1]["role"] == "assistant":
        raise UnsupportedContentError(
            "The last message is an assistant turn; end with a user turn for the model to answer."
        )
    from .images import load_images  # the one place images are decoded and checked

    images = load_images([p["image"] for p in image_parts], policy, max_side=max_side)
    for part, image in zip(image_parts, images, strict=True):
        part["image"] = image
    user_turns = [m for m in parsed if m["role"] == "user"]
    request = ""
    if user_turns:
        request = "".join(p["text"] for p in user_turns[-1]["content"] if p["type"] == "text").strip()
    return Conversation(messages=tuple(parsed), images=tuple(images), request=request)


def neutralize_special_tokens(text: str, specials: Sequence[str]) -> str:
    """Break every special-token string inside user `text` so it tokenizes as plain text.

    A zero-width space goes after the first character of each occurrence
    (`<image>` becomes `<\u200bimage>`): the model reads the same characters,
    but the tokenizer no longer matches the special token. Longest first, so
    a token that contains another is broken whole.
    """
    for tok in _longest_first(tuple(specials)):
        if tok in text:
            text = text.replace(tok, tok[0] + "\u200b" + tok[1:])
    return text


def neutralize_text_parts(texts: Sequence[str], specials: Sequence[str]) -> list[str]:
    """`neutralize_special_tokens` for the text parts of one message, which a template writes
    one after another: a token split across parts ("hi<|im_" + "end|>") is broken too.

    Each part is neutralized alone; then wherever a special-token string spans a
    boundary between parts, the zero-width space goes after its first character,
    in the part that holds it.
    """
    out = [neutralize_special_tokens(t, specials) for t in texts]
    tokens = _longest_first(tuple(specials))
    if len(out) < 2 or not tokens:
        return out
    reach = len(tokens[0]) - 1  # a token spanning a boundary starts at most this far before it
    k = 0
    while k < len(out) - 1:
        window, cut = _around_boundary(out, k, reach)
        spanning = next((i for t in tokens for i in _occurrences(window, t) if i < cut < i + len(t)), None)
        if spanning is None:
            k += 1
            continue
        # the token's first character lies `cut - spanning` characters before the boundary
        part, back = k, cut - spanning
        while back > len(out[part]):
            back -= len(out[part])
            part -= 1
        offset = len(out[part]) - back + 1
        out[part] = out[part][:offset] + "\u200b" + out[part][offset:]
    return out


def _around_boundary(parts: Sequence[str], k: int, reach: int) -> tuple[str, int]:
    """The joined text within `reach` characters of the boundary after `parts[k]`, and where
    the boundary falls in it."""
    left, j = "", k
    while j >= 0 and len(left) < reach:
        left, j = parts[j] + left, j - 1
    right, j = "", k + 1
    while j < len(parts) and len(right) < reach:
        right, j = right + parts[j], j + 1
    left = left[len(left) - reach :] if len(left) > reach else left
    return left + right[:reach], len(left)


def _occurrences(text: str, token: str) -> Iterator[int]:
    i = text.find(token)
    while i >= 0:
        yield i
        i = text.find(token, i + 1)


_SORTED_SPECIALS: dict[tuple[str, ...], tuple[str, ...]] = {}


def _longest_first(specials: tuple[str, ...]) -> tuple[str, ...]:
    # Sorted once per tokenizer: neutralizing a tool schema visits every string in it.
    held = _SORTED_SPECIALS.get(specials)
    if held is None:
        if len(_SORTED_SPECIALS) > 32:  # a handful of tokenizers per process; stay bounded
            _SORTED_SPECIALS.clear()
        held = _SORTED_SPECIALS[specials] = tuple(sorted({s for s in specials if len(s) > 1}, key=len, reverse=True))
    return held


#: Deepest nesting of lists and dicts accepted in what reaches a chat template as
#: structure (tool-call arguments, tool schemas). Every walk over such values (ours,
#: JSON encoding, Jinja's `tojson`) recurses once per level; real arguments and schemas
#: stay far below this, and a request nested deeper gets `InputLimitError`, not a
#: `RecursionError` from deep inside a library.
MAX_NESTING_DEPTH = 64


def _neutralize_values(value: Any, specials: Sequence[str], where: str = "a tool value", depth: int = 0) -> Any:
    """`value` (tool-call arguments, tool schemas: dicts, lists, strings) with every string
    neutralized, dict keys included; `InputLimitError` past `MAX_NESTING_DEPTH` levels."""
    if depth > MAX_NESTING_DEPTH:
        raise InputLimitError(
            f"{where} is nested more than {MAX_NESTING_DEPTH} levels deep. Flatten the structure "
            "(tool arguments and schemas rarely need more than a few levels)."
        )
    if isinstance(value, str):
        return neutralize_special_tokens(value, specials)
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            safe_key = neutralize_special_tokens(key, specials) if isinstance(key, str) else key
            if safe_key in out:
                # only keys that differ by a special token collide; the model must not lose one silently
                raise UnsupportedContentError(
                    f"{where} has keys {key!r} and {safe_key!r}, which read the same once special-token "
                    "strings are made plain text. Rename one of them."
                )
            out[safe_key] = _neutralize_values(item, specials, where, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_neutralize_values(v, specials, where, depth + 1) for v in value]
    return value


def render_prompt(
    processor: Any,
    messages: Sequence[Mapping[str, Any]],
    specials: Sequence[str] = (),
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt string from the processor's chat template, ready for the assistant's turn.

    Image parts become `{"type": "image"}` placeholders the template expands.
    Every string the caller controls that reaches the template has its
    special-token strings neutralized first: text parts, tool results, tool
    calls in history (name, id, argument keys and values), tool messages'
    `name` and `tool_call_id`, and the `tools` schemas (names, descriptions,
    parameter names, enums...). `tools` (OpenAI-format function schemas) go to
    the template's `tools=` argument. Structures nested deeper than
    `MAX_NESTING_DEPTH` raise `InputLimitError`; a template that rejects the
    conversation (e.g. roles that must alternate) raises `UnsupportedContentError`.
    """
    template_messages = []
    for i, m in enumerate(messages):
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        texts = iter(neutralize_text_parts([p["text"] for p in content if p["type"] != "image"], specials))
        parts = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": next(texts)} for p in content]
        rendered: dict[str, Any] = {"role": m["role"], "content": parts}
        if m["role"] == "tool" or m.get("tool_calls"):
            # Tool-capable templates written for text models read these turns' content as a
            # string (some `tojson` a list), so text-only tool turns go in as one string.
            rendered["content"] = "".join(p["text"] for p in parts)
            rendered.update(
                {k: neutralize_special_tokens(str(m[k]), specials) for k in ("tool_call_id", "name") if k in m}
            )
        if m.get("tool_calls"):
            rendered["tool_calls"] = [
                _neutralize_values(c, specials, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])
            ]
        template_messages.append(rendered)
    # Some processors (InstructBLIP in transformers 5.x) drop their template on reload
    # while their tokenizer keeps it.
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    if template is None:
        raise UnsupportedModelError(
            f"{type(processor).__name__} has no chat template. Set `processor.chat_template` "
            "to a Jinja template (see the model card) before using it with SafeCoDe."
        )
    extra: dict[str, Any] = {}
    if tools:
        extra["tools"] = [_neutralize_values(t, specials, f"tools[{j}]") for j, t in enumerate(tools)]
    from jinja2 import TemplateError  # transformers' own template engine

    try:
        return processor.apply_chat_template(
            template_messages,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **extra,
        )
    except TemplateError as exc:
        raise UnsupportedContentError(
            f"The chat template of {type(processor).__name__} rejected this conversation: {exc}. "
            "Check the order of the turns (many templates want user and assistant turns to alternate, "
            "starting with a user turn) or set `processor.chat_template` to a template that accepts it."
        ) from exc
