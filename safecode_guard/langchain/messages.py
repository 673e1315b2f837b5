"""LangChain messages -> Hugging Face chat messages, as small pure functions.

Input: LangChain `BaseMessage`s as `ChatSafeCoDe` receives them. Content is
read through `message.content_blocks`, which already turns every shape
LangChain produces into v1 standard blocks: plain strings, OpenAI
`image_url` parts (data URLs become `{"type": "image", "base64", "mime_type"}`),
v0 `source_type` blocks, Anthropic `source` blocks and v1 blocks.

Output: `[{"role": "system" | "user" | "assistant" | "tool", "content": [parts]}]` with
parts `{"type": "text", "text": str}` and `{"type": "image", "image": PIL.Image}`,
the format `SafeCoDe.generate` takes. Tool calling uses the transformers
conventions: an `AIMessage`'s `tool_calls` become the assistant turn's
`tool_calls` (`{"type": "function", "id", "function": {"name", "arguments"}}`)
and a `ToolMessage` becomes `{"role": "tool", "content", "tool_call_id", "name"}`. Images are
decoded here, by `safecode_guard.images.load_images` under the caller's `InputPolicy` (so an
http(s) URL is fetched only when the policy allows URLs), once every message is converted and
the request's images are counted, with their total bytes and declared pixels: nothing is
decoded before the request is known to fit.
Consecutive turns of one role are left as they are: the engine merges them.

Anything that cannot be shown to the model faithfully raises
`UnsupportedContentError` naming the block and the fix: audio, video and
file blocks, images by provider `file_id`, images in tool results, legacy
`FunctionMessage`s and provider server-side tool blocks. Reasoning blocks in
earlier assistant turns are dropped, as chat templates drop a model's private
reasoning from history; so are earlier invalid tool calls (they were never run).

To support a new message type or block type, add an entry to `ROLE_BY_TYPE`
or `BLOCK_CONVERTERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from langchain_core.messages import BaseMessage, ChatMessage

from ..config import InputPolicy
from ..control import checkpoint
from ..errors import UnsupportedContentError
from ..images import load_image, load_images
from ..prompting import check_counts
from .tools import hf_tool_calls

__all__ = [
    "BLOCK_CONVERTERS",
    "ROLE_BY_TYPE",
    "block_to_part",
    "image_from_block",
    "image_source",
    "message_role",
    "to_hf_message",
    "to_hf_messages",
]

Part = dict[str, Any]
BlockConverter = Callable[[Mapping[str, Any], str, str, InputPolicy], "Part | None"]

#: LangChain `message.type` -> chat-template role.
ROLE_BY_TYPE: dict[str, str] = {"system": "system", "human": "user", "ai": "assistant", "tool": "tool"}

#: Roles a generic `ChatMessage(role=...)` may carry, and the template role each means.
_CHAT_MESSAGE_ROLES: dict[str, str] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
}

_PROVIDER_REASONING = ("thinking", "redacted_thinking")

_NO_FUNCTIONS = (
    "Legacy function messages are not supported. Use tool calling (bind_tools) and answer each call "
    "with a ToolMessage(content, tool_call_id=...)."
)
_SERVER_TOOLS = (
    "Provider server-side tools cannot run on a local model. Remove the block, or use bind_tools "
    "with function tools and ToolMessage results."
)


def message_role(message: BaseMessage, where: str) -> str:
    """The chat-template role of `message`, or `UnsupportedContentError` for function messages and unknown types."""
    if isinstance(message, ChatMessage):
        role = _CHAT_MESSAGE_ROLES.get(message.role.lower())
        if role is None:
            raise UnsupportedContentError(
                f"{where} is a ChatMessage with role {message.role!r}. "
                f"Use one of {sorted(_CHAT_MESSAGE_ROLES)}, or a SystemMessage / HumanMessage / AIMessage."
            )
        return role
    role = ROLE_BY_TYPE.get(message.type)
    if role is not None:
        return role
    if message.type == "function":
        raise UnsupportedContentError(f"{where} is a {type(message).__name__}. {_NO_FUNCTIONS}")
    raise UnsupportedContentError(
        f"{where} is a {type(message).__name__} (type {message.type!r}), which ChatSafeCoDe cannot read. "
        "Use SystemMessage, HumanMessage and AIMessage."
    )


def image_source(block: Mapping[str, Any], where: str) -> Any:
    """The image value of a v1 image block (`base64`, `url`, or an in-memory `image`), not yet decoded.

    `base64` becomes a data URL, so bare base64 (which may hold '/') is never
    read as a path. What `images.load_image` accepts comes back as is.
    """
    if block.get("base64") is not None:
        return "data:;base64," + str(block["base64"])
    if block.get("url") is not None:
        return block["url"]
    if block.get("image") is not None:  # an HF-style part holding a PIL image or bytes
        return block["image"]
    if block.get("file_id") is not None:
        raise UnsupportedContentError(
            f"{where} is an image given by provider file id {block['file_id']!r}; a local model cannot "
            'resolve file ids. Send the image itself: {"type": "image", "base64": ..., "mime_type": "image/png"}.'
        )
    raise UnsupportedContentError(
        f"{where} is an image block without image data (keys: {sorted(block)}). "
        'Give "base64" (with "mime_type") or a data URL in "url".'
    )


def image_from_block(
    block: Mapping[str, Any], where: str, policy: InputPolicy, *, max_side: int | None = None
) -> Any:
    """A PIL RGB image from a v1 image block (`base64`, `url`, or an in-memory `image`).

    `url` may be a data URL, an http(s) URL (fetched only if
    `policy.allow_image_urls`) or a file:// URL (only if `policy.allow_local_files`).
    """
    return load_image(image_source(block, where), policy, max_side=max_side)


def _text(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part:
    text = block.get("text")
    if not isinstance(text, str):
        raise UnsupportedContentError(f'{where} is a text block whose "text" is not a string.')
    return {"type": "text", "text": text}


def _image(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part:
    if role == "tool":
        raise UnsupportedContentError(
            f"{where} is an image in a tool result; local chat templates show tool results as text. "
            "Move the image into a HumanMessage, or return text from the tool."
        )
    if role != "user":
        raise UnsupportedContentError(
            f"{where} is an image in a {role} turn; only user (HumanMessage) turns may carry images. "
            "Move the image into a HumanMessage."
        )
    return {"type": "image", "image": image_source(block, where)}  # decoded with the request's others


def _reasoning(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> None:
    return None  # earlier turns' private reasoning is not replayed to the model


def _tool_call(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part | None:
    if role == "assistant":
        return None  # read from `AIMessage.tool_calls` by `to_hf_message`, in the template's format
    raise UnsupportedContentError(
        f"{where} is a {block['type']!r} block in a {role} turn; only AIMessages make tool calls. "
        "Move tool calls into AIMessage(tool_calls=[...])."
    )


def _server_tool(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part:
    raise UnsupportedContentError(f"{where} is a {block['type']!r} block. {_SERVER_TOOLS}")


def _non_standard(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part:
    value = block.get("value")
    # `{"type": "image_url", "image_url": "<url>"}` (a bare string, not a dict) is a common
    # OpenAI shorthand that `content_blocks` does not recognise.
    if isinstance(value, Mapping) and value.get("type") == "image_url" and isinstance(value.get("image_url"), str):
        return _image({"type": "image", "url": value["image_url"]}, where, role, policy)
    if role == "assistant" and isinstance(value, Mapping) and value.get("type") in _PROVIDER_REASONING:
        return None  # provider-specific reasoning (Anthropic "thinking"), dropped like "reasoning"
    if role == "assistant" and isinstance(value, Mapping) and value.get("type") == "tool_use":
        return None  # Anthropic's copy of a call that `AIMessage.tool_calls` also holds
    kind = value.get("type") if isinstance(value, Mapping) else type(value).__name__
    raise UnsupportedContentError(
        f"{where} is a {kind!r} block, which ChatSafeCoDe cannot read. "
        'Send text blocks and image blocks ({"type": "image", "base64": ..., "mime_type": ...}).'
    )


def _unsupported_media(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part:
    kind = block["type"]
    raise UnsupportedContentError(
        f"{where} is a {kind!r} block; ChatSafeCoDe reads text and images only. "
        f"Remove the {kind} block, or describe its content in text."
    )


#: v1 block type -> converter returning an HF part, or None to drop the block.
BLOCK_CONVERTERS: dict[str, BlockConverter] = {
    "text": _text,
    "image": _image,
    "reasoning": _reasoning,
    "tool_call": _tool_call,
    "tool_call_chunk": _tool_call,
    "invalid_tool_call": _tool_call,
    "server_tool_call": _server_tool,
    "server_tool_call_chunk": _server_tool,
    "server_tool_result": _server_tool,
    "non_standard": _non_standard,
    "audio": _unsupported_media,
    "video": _unsupported_media,
    "file": _unsupported_media,
    "text-plain": _unsupported_media,
}


def block_to_part(block: Mapping[str, Any], where: str, role: str, policy: InputPolicy) -> Part | None:
    """One v1 content block as an HF content part (None: dropped on purpose)."""
    converter = BLOCK_CONVERTERS.get(str(block.get("type")))
    if converter is None:
        raise UnsupportedContentError(
            f"{where} has type {block.get('type')!r}, which ChatSafeCoDe cannot read. "
            "Send text blocks and image blocks."
        )
    return converter(block, where, role, policy)


def _convert(message: BaseMessage, index: int, policy: InputPolicy) -> dict[str, Any]:
    """`message` as `{"role", "content": [parts]}`, image parts still holding their undecoded values."""
    where = f"messages[{index}] ({type(message).__name__})"
    role = message_role(message, where)
    try:
        blocks = message.content_blocks
    except (ValueError, TypeError, KeyError) as exc:
        # langchain-core's normaliser rejects malformed blocks with bare errors; say where and how to fix
        raise UnsupportedContentError(
            f"{where} holds a malformed content block ({exc}). Use text blocks and image blocks "
            'such as {"type": "image", "base64": ..., "mime_type": "image/png"}.'
        ) from exc
    parts: list[Part] = []
    for j, block in enumerate(blocks):
        part = block_to_part(block, f"{where}.content[{j}]", role, policy)
        if part is not None:
            parts.append(part)
    hf: dict[str, Any] = {"role": role, "content": parts}
    if role == "assistant" and getattr(message, "tool_calls", None):
        hf["tool_calls"] = hf_tool_calls(message.tool_calls)
    if role == "tool":
        hf["tool_call_id"] = str(getattr(message, "tool_call_id", ""))
        if message.name:
            hf["name"] = message.name
    return hf


def _decode_images(messages: list[dict[str, Any]], policy: InputPolicy, max_side: int | None) -> None:
    """Decode every image part of `messages` in place, the request's limits checked first."""
    parts = [p for m in messages for p in m["content"] if p["type"] == "image"]
    images = load_images([p["image"] for p in parts], policy, max_side=max_side)
    for part, image in zip(parts, images, strict=True):
        part["image"] = image


def to_hf_message(
    message: BaseMessage, index: int, policy: InputPolicy, *, max_side: int | None = None
) -> dict[str, Any]:
    """`message` (the `index`-th of the request) as `{"role", "content": [parts]}`, images decoded."""
    hf = _convert(message, index, policy)
    _decode_images([hf], policy, max_side)
    return hf


def to_hf_messages(
    messages: Sequence[BaseMessage], policy: InputPolicy, *, max_side: int | None = None
) -> list[dict[str, Any]]:
    """A LangChain conversation as Hugging Face chat messages, images decoded to PIL.

    Every message is converted and the images counted (with their total bytes
    and declared pixels) before any image is decoded; images come back RGB,
    their longer side at most `max_side` (and `policy.max_working_side`).
    """
    check_counts(messages, policy)  # before any message is converted
    converted = []
    for i, m in enumerate(messages):
        checkpoint()  # a cancelled request stops here
        converted.append(_convert(m, i, policy))
    _decode_images(converted, policy, max_side)
    return converted
