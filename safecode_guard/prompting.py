"""From a `Conversation` to the model's prompt string.

The conversation comes from `messages.parse_messages` (re-exported here):
validated messages with PIL images, the images in order, the tools and the
answer's forced opening. `render_prompt` renders it with the processor's own
chat template (with `tools=` when the request offers tools), every string the
caller controls neutralized first; `template_joins` reads how that template
joins a message's content parts, so a judge reads the text as the model does.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .errors import (
    InputLimitError,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from .messages import (
    MAX_NESTING_DEPTH,
    ROLES,
    Conversation,
    check_counts,
    count_parts,
    parse_messages,
)

__all__ = [
    "MAX_NESTING_DEPTH",
    "ROLES",
    "Conversation",
    "check_counts",
    "count_parts",
    "neutralize_special_tokens",
    "neutralize_text_parts",
    "parse_messages",
    "render_prompt",
    "special_strings",
    "template_joins",
]

#: Processor attributes that hold marker strings (images, their boundaries, videos) a model reads as structure.
PROCESSOR_MARKERS = ("image_token", "boi_token", "eoi_token", "video_token")


def special_strings(processor: Any, tokenizer: Any = None, markers: Sequence[str] = PROCESSOR_MARKERS) -> tuple[str, ...]:
    """The special-token strings to neutralize in user text: the tokenizer's special and added
    special tokens, plus the processor's marker strings (`markers`). `tokenizer` defaults to the
    processor's own (or the processor itself when it is a bare tokenizer)."""
    tokenizer = getattr(processor, "tokenizer", processor) if tokenizer is None else tokenizer
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    for attr in markers:
        value = getattr(processor, attr, None)
        if isinstance(value, str):
            specials.add(value)
    return tuple(sorted(specials))


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


def _template_messages(messages: Sequence[Mapping[str, Any]], specials: Sequence[str]) -> list[dict[str, Any]]:
    """`messages` as the chat template receives them: image parts as placeholders, every
    caller-controlled string neutralized, tool turns' text as one string."""
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
    return template_messages


def _template_tools(tools: Sequence[Mapping[str, Any]] | None, specials: Sequence[str]) -> list[Any] | None:
    return [_neutralize_values(t, specials, f"tools[{j}]") for j, t in enumerate(tools)] if tools else None


def _apply_template(
    processor: Any, template_messages: list[dict[str, Any]], tools: list[Any] | None, add_generation_prompt: bool
) -> str:
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
    extra: dict[str, Any] = {"tools": tools} if tools else {}
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


def render_prompt(
    processor: Any,
    messages: Sequence[Mapping[str, Any]] | Conversation,
    specials: Sequence[str] = (),
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt string from the processor's chat template, ready for the assistant's turn.

    `messages` is a `Conversation` (its `tools` are rendered, and its
    `answer_prefix` ends the prompt) or a list of validated messages (`tools`
    then says which tools). Image parts become `{"type": "image"}`
    placeholders the template expands. Every string the caller controls that
    reaches the template has its special-token strings neutralized first: text
    parts, tool results, tool calls in history (name, id, argument keys and
    values), tool messages' `name` and `tool_call_id`, and the `tools` schemas
    (names, descriptions, parameter names, enums...). `tools` (OpenAI-format
    function schemas) go to the template's `tools=` argument. Structures nested
    deeper than `MAX_NESTING_DEPTH` raise `InputLimitError`; a template that
    rejects the conversation (e.g. roles that must alternate) raises
    `UnsupportedContentError`.
    """
    prefix = ""
    if isinstance(messages, Conversation):
        if tools is not None:
            raise SafeCoDeInputError("Give `tools` in the Conversation (`conv.with_request(tools=...)`), not twice.")
        messages, tools, prefix = messages.messages, messages.tools, messages.answer_prefix
    rendered = _apply_template(
        processor, _template_messages(messages, specials), _template_tools(tools, specials), add_generation_prompt
    )
    return rendered + prefix


# Private-use characters around each content part in the probe render of `template_joins`:
# a template has no reason to touch them, and with a fresh nonce per call user text cannot
# forge one.
_OPEN, _MID, _CLOSE = "\ue000", "\ue001", "\ue002"


def template_joins(
    processor: Any, conversation: Conversation, specials: Sequence[str] = ()
) -> tuple[tuple[str, ...], ...] | None:
    """Per message of `conversation`, the text its chat template writes between consecutive content parts.

    The template renders the conversation once more with every content part
    (images included, as text) wrapped in markers no user text can forge;
    what lies between the end of part k and the start of part k+1 is how the
    template joins them ("" for most templates, a space or a newline for
    others). A join that cannot be read that way (the template left a part
    out, or moved it) is "" (the parts then read concatenated). None when the
    template rejects the probe, and `()` for a message without joins (one
    part, or a tool turn, which is rendered as one string).
    """
    if all(len(m["content"]) < 2 or m["role"] == "tool" or m.get("tool_calls") for m in conversation.messages):
        return tuple(() for _ in conversation.messages)  # nothing to join: skip the second render
    nonce = secrets.token_hex(8)

    def mark(kind: str, i: int, k: int) -> str:
        return f"{kind}{nonce}{_MID}{i}.{k}{kind}"

    probe = []
    for i, m in enumerate(_template_messages(conversation.messages, specials)):
        if not isinstance(m["content"], str):
            m = {
                **m,
                "content": [
                    {"type": "text", "text": mark(_OPEN, i, k) + p.get("text", "") + mark(_CLOSE, i, k)}
                    for k, p in enumerate(m["content"])
                ],
            }
        probe.append(m)
    try:
        out = _apply_template(processor, probe, _template_tools(conversation.tools, specials), True)
    except SafeCoDeInputError:
        return None
    joins = []
    for i, m in enumerate(probe):
        glue = []
        for k in range(len(m["content"]) - 1 if not isinstance(m["content"], str) else 0):
            close = mark(_CLOSE, i, k)
            end = out.find(close)
            start = out.find(mark(_OPEN, i, k + 1), end) if end >= 0 else -1
            between = out[end + len(close) : start] if start >= 0 else ""
            glue.append("" if nonce in between else between)
        joins.append(tuple(glue))
    return tuple(joins)
