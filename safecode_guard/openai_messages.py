"""OpenAI chat messages <-> LangChain messages, as small pure functions that refuse what they cannot read.

Used by the HTTP server (`serving`) and the NeMo integration, which both
receive OpenAI-style requests. Input: the `messages` of a chat-completions request (`system` / `developer`,
`user` with text and `image_url` parts, `assistant` with `tool_calls` whose
arguments are JSON strings, `tool` results). Output: LangChain messages for
`ChatSafeCoDe`, which decodes images under the server's `InputPolicy`.
Anything malformed raises `UnsupportedContentError` naming the message and the fix.

Output side: `tool_calls_out` turns an answer's LangChain tool calls into
OpenAI's `tool_calls` (arguments as JSON text; calls the model wrote badly
keep their raw text, as OpenAI's own API may return invalid JSON there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from .errors import UnsupportedContentError
from .openai_format import message_text as _text
from .openai_format import tool_calls_in as _tool_calls_in
from .openai_format import user_content as _user_content

__all__ = ["to_langchain", "tool_calls_out"]

def to_langchain(messages: Sequence[Mapping[str, Any]]) -> list[BaseMessage]:
    """OpenAI chat messages as LangChain messages (`UnsupportedContentError` for anything malformed)."""
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        name = m.get("name") if isinstance(m.get("name"), str) else None
        if role in ("system", "developer"):
            out.append(SystemMessage(_text(m.get("content"), where)))
        elif role == "user":
            out.append(HumanMessage(_user_content(m.get("content"), where), name=name))
        elif role == "assistant":
            calls = _tool_calls_in(m["tool_calls"], where) if m.get("tool_calls") else []
            out.append(AIMessage(_text(m.get("content"), where), tool_calls=calls, name=name))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise UnsupportedContentError(f"{where} is a tool result without a tool_call_id; give the id of the call it answers.")
            out.append(ToolMessage(_text(m.get("content"), where), tool_call_id=call_id))
        else:
            raise UnsupportedContentError(f"{where}.role is {role!r}; use system, developer, user, assistant or tool.")
    return out


def tool_calls_out(message: AIMessage) -> list[dict[str, Any]]:
    """The answer's tool calls in OpenAI's shape, in the order the model wrote them."""
    calls = [
        {"id": c.get("id") or "", "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
        for c in message.tool_calls
    ]
    calls += [
        {"id": c.get("id") or "", "type": "function", "function": {"name": c.get("name") or "", "arguments": c.get("args") or ""}}
        for c in message.invalid_tool_calls
    ]
    return calls
