"""Moved to `safecode_guard.langchain` (`ChatSafeCoDe` in `langchain.chat_model`); this path keeps working."""

from .langchain import (
    CALL_OPTIONS,
    PROVIDER,
    ChatSafeCoDe,
    answer_check_metadata,
    check_nested_settings,
    check_settings,
    images_inline,
    init_chat_model,
    judge_fingerprint,
    merge_turns,
    refusal_decision,
    replace_unsafe_answer,
    retry_delay,
    safety_metadata,
    sampling_kwargs,
    special_strings,
)

__all__ = [
    "CALL_OPTIONS",
    "PROVIDER",
    "ChatSafeCoDe",
    "answer_check_metadata",
    "check_nested_settings",
    "check_settings",
    "images_inline",
    "init_chat_model",
    "judge_fingerprint",
    "merge_turns",
    "refusal_decision",
    "replace_unsafe_answer",
    "retry_delay",
    "safety_metadata",
    "sampling_kwargs",
    "special_strings",
]
