"""Moved to `safecode_guard.langchain.middleware`; this path keeps working."""

from .langchain.middleware import (
    DEFAULT_REFUSAL_MESSAGE,
    SafeCoDeMiddleware,
    SafeCoDeState,
    judge_request_from_messages,
)

__all__ = [
    "DEFAULT_REFUSAL_MESSAGE",
    "SafeCoDeMiddleware",
    "SafeCoDeState",
    "judge_request_from_messages",
]
