"""Moved to `safecode_guard.langchain.messages`; this path keeps working."""

from .langchain.messages import (
    BLOCK_CONVERTERS,
    ROLE_BY_TYPE,
    block_to_part,
    image_from_block,
    image_source,
    message_role,
    to_hf_message,
    to_hf_messages,
)

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
