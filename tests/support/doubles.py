"""Test doubles of the judges' collaborators: a chat model that records what it is shown, an engine that scores fixed logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import Field


class RecordingChatModel(FakeListChatModel):
    """FakeListChatModel that keeps the messages of every call."""

    seen: list[list[BaseMessage]] = Field(default_factory=list)

    def _call(self, messages, stop=None, run_manager=None, **kwargs):
        self.seen.append(list(messages))
        return super()._call(messages, stop=stop, run_manager=run_manager, **kwargs)


class FakeEngine:
    """The two engine methods a self judge uses, with fixed answers; records every call.

    `calls` holds `(method name, messages)` in call order; `caption_lengths` the
    `max_new_tokens` of each `plain_text` call; `inference_mode` whether torch's
    inference mode was on for each `next_token_logits` call.
    """

    def __init__(self, tokenizer: Any, logits: torch.Tensor, caption: str = "  A man at a cliff edge.  ") -> None:
        self.tokenizer = tokenizer
        self.logits = logits
        self.caption = caption
        self.calls: list[tuple[str, Any]] = []
        self.caption_lengths: list[int] = []
        self.inference_mode: list[bool] = []

    def next_token_logits(self, messages: Any) -> torch.Tensor:
        self.calls.append(("next_token_logits", messages))
        self.inference_mode.append(torch.is_inference_mode_enabled())
        return self.logits

    def plain_text(self, messages: Any, max_new_tokens: int = 64) -> str:
        self.calls.append(("plain_text", messages))
        self.caption_lengths.append(max_new_tokens)
        return self.caption


class ScriptedChatModel(BaseChatModel):
    """Another provider's chat model, scripted: returns `replies` in order and records its inputs."""

    replies: list[AIMessage] = Field(default_factory=list)
    seen: list[list[BaseMessage]] = Field(default_factory=list)
    options: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any,
    ) -> ChatResult:
        self.seen.append(list(messages))
        self.options.append(kwargs)
        return ChatResult(generations=[ChatGeneration(message=self.replies.pop(0))])
