"""LangChain faces of SafeCoDe: the `ChatSafeCoDe` chat model, message conversion, tools, agent middleware.

Modules: `chat_model` (ChatSafeCoDe), `messages` (LangChain -> HF messages), `chunks`
(answers as chunks), `cache` (LLM-cache keys), `tool_calls` (tool and JSON-mode planning),
`tools` (tool-call rendering and parsing), `engines` (engines built on shared weights),
`calls` (one call's checks, deadline and retries), `settings` (options and key checks),
`factory` (init_chat_model), `middleware` (SafeCoDeMiddleware for agents).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# langchain_core (and the model stack) load on first use: importing the package costs nothing.
_LAZY = {
    "ChatSafeCoDe": "chat_model",
    "init_chat_model": "factory",
    "SafeCoDeMiddleware": "middleware",
    "CALL_OPTIONS": "settings",
    "PROVIDER": "settings",
    "check_nested_settings": "settings",
    "check_settings": "settings",
    "sampling_kwargs": "settings",
    "images_inline": "cache",
    "judge_fingerprint": "cache",
    "merge_turns": "calls",
    "retry_delay": "calls",
    "special_strings": "..prompting",
    "replace_unsafe_answer": "chunks",
    "answer_check_metadata": "..verdict",
    "safety_metadata": "..verdict",
    "refusal_decision": "..ops",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module if module.startswith("..") else f".{module}", __name__), name)
    globals()[name] = value
    return value
