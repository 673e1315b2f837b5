"""OpenAI chat messages as the engine reads them, framework-neutral (no LangChain).

The `messages` of a chat-completions request (`system` / `developer`, `user`
with text and `image_url` parts, `assistant` with `tool_calls` whose
arguments are JSON strings, `tool` results) -> Hugging Face chat messages
(`to_hf_messages`), which `SafeCoDe` parses, decoding the images under its
`InputPolicy`. Anything malformed raises `UnsupportedContentError` naming the
message and the fix. `openai_messages` builds LangChain messages from the
same readers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InputLimitError, UnsupportedContentError
from .messages import MAX_NESTING_DEPTH, check_nesting, json_text_depth

__all__ = ["message_text", "to_hf_messages", "tool_calls_in", "user_content"]

_PART_TYPES = ("text", "image_url")


def message_text(content: Any, where: str) -> str:
    """A system / assistant / tool message's content as text (a string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise UnsupportedContentError(
                    f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": \"...\"}}; "
                    "only user messages may carry images."
                )
            texts.append(part["text"])
        return "".join(texts)
    raise UnsupportedContentError(f"{where}.content is a {type(content).__name__}; use a string or a list of text parts.")


def user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise UnsupportedContentError(
            f"{where}.content must be a string or a non-empty list of parts "
            '({"type": "text", ...} or {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}).'
        )
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in _PART_TYPES:
            raise UnsupportedContentError(
                f"{where}.content[{j}] has type {kind!r}; this server reads \"text\" and \"image_url\" parts."
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise UnsupportedContentError(f'{where}.content[{j}] is a text part whose "text" is not a string.')
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str) or not url:
                raise UnsupportedContentError(
                    f'{where}.content[{j}] is an image_url part without a URL; use {{"image_url": {{"url": "data:image/png;base64,..."}}}}.'
                )
            part = {"type": "image_url", "image_url": {"url": url}}
        parts.append(dict(part))
    return parts


def tool_calls_in(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise UnsupportedContentError(f"{where}.tool_calls must be a list of tool calls.")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not (isinstance(fn, Mapping) and isinstance(fn.get("name"), str) and isinstance(call.get("id"), str)):
            raise UnsupportedContentError(
                f'{where}.tool_calls[{j}] must be {{"id": str, "type": "function", "function": {{"name": str, "arguments": str}}}}.'
            )
        raw = fn.get("arguments", "{}")
        if isinstance(raw, str) and json_text_depth(raw) > MAX_NESTING_DEPTH:
            # json.loads recurses per level: refuse before it raises RecursionError
            raise InputLimitError(
                f"{where}.tool_calls[{j}].function.arguments is nested more than {MAX_NESTING_DEPTH} levels "
                "deep. Flatten the arguments."
            )
        try:
            args = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError as exc:
            raise UnsupportedContentError(
                f"{where}.tool_calls[{j}].function.arguments is not valid JSON ({exc.msg} at character {exc.pos}). "
                "Send the arguments as a JSON object in a string."
            ) from exc
        if not isinstance(args, dict):
            raise UnsupportedContentError(f"{where}.tool_calls[{j}].function.arguments must encode a JSON object.")
        out.append({"name": fn["name"], "args": args, "id": call["id"], "type": "tool_call"})
    return out


def _hf_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read calls in the transformers chat format (arguments as a dict), nesting bounded."""
    out = []
    for i, call in enumerate(calls):
        check_nesting(call["args"], f"The arguments of tool_calls[{i}] ({call['name']!r})")
        out.append({"type": "function", "id": call["id"], "function": {"name": call["name"], "arguments": dict(call["args"])}})
    return out


def _text_parts(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}] if text else []


def to_hf_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Hugging Face chat messages; images stay URLs (the engine decodes them)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_parts(message_text(m.get("content"), where))})
        elif role == "user":
            content = user_content(m.get("content"), where)
            parts = _text_parts(content) if isinstance(content, str) else [
                p if p["type"] == "text" else {"type": "image", "image": p["image_url"]["url"]} for p in content
            ]
            out.append({"role": "user", "content": parts})
        elif role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": _text_parts(message_text(m.get("content"), where))}
            if m.get("tool_calls"):
                turn["tool_calls"] = _hf_calls(tool_calls_in(m["tool_calls"], where))
            out.append(turn)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise UnsupportedContentError(f"{where} is a tool result without a tool_call_id; give the id of the call it answers.")
            out.append({"role": "tool", "content": _text_parts(message_text(m.get("content"), where)), "tool_call_id": call_id})
        else:
            raise UnsupportedContentError(f"{where}.role is {role!r}; use system, developer, user, assistant or tool.")
    return out
