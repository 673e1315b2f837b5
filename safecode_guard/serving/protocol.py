"""OpenAI's chat-completions wire protocol, as pydantic models (the subset a local VLM serves).

Requests are validated strictly: a field we do not implement is refused
with a clear message (OpenAI itself answers "Unrecognized request argument"),
never silently ignored. The one addition is `safecode`, per-request SafeCoDe
settings, accepted only when the server was started to allow them.

Responses are OpenAI's shapes plus a top-level `safety` object (the keys of
`response_metadata["safety"]`, SPEC section 5). OpenAI clients keep extra
fields (`completion.model_extra["safety"]` in the `openai` package).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import SafeCoDeInputError
from ..sampling import SamplingParams

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ErrorBody",
    "ErrorResponse",
    "ModelCard",
    "ModelList",
    "SafeCoDeRequestSettings",
    "completion_id",
]


#: Most choices (`n`) one request may ask for.
MAX_CHOICES = 8


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the usage counts and no choices."""


class SafeCoDeRequestSettings(_Strict):
    """Per-request SafeCoDe settings (only on servers started with `--allow-request-settings`)."""

    judge: Literal["self", "self:direct", "self:caption", "fixed:safe", "fixed:unsafe"] | None = None
    """A judge that runs on the server's own model, or a pinned verdict. Remote (`chat:`) judges
    are never chosen by clients."""
    verdict: Literal["safe", "unsafe"] | None = None
    """Skip the judge and steer with this verdict (`source="override"`)."""
    alpha: float | None = None
    noise_std: float | None = None
    steered_steps: int | None = None
    lambda_boost: float | None = None
    lambda_supp: float | None = None
    unsafe_mode: Literal["prefix", "boost"] | None = None
    plausibility_beta: float | None = None
    threshold: float | None = None

    def config_updates(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in self.model_dump(exclude={"judge", "verdict"}).items()
            if v is not None
        }


class ChatCompletionRequest(_Strict):
    """`POST /v1/chat/completions`.

    The decoding options are typed here and validated by `SamplingParams`
    (`sampling()`), so the server refuses a value exactly as the engine and
    `ChatSafeCoDe` do, with the same message.
    """

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str | None = None
    """One of the server's served names (`ServerSettings.names`); left out: the served model."""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    """Token id -> bias; the values are checked by `SamplingParams` (as sent, so its message quotes them)."""
    logprobs: bool | None = None
    top_logprobs: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    """Choices per request: they share one judge verdict (and the images' vision features)."""
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    """An end-user id, as in OpenAI's API: logged, never used to decide anything."""
    store: bool | None = None
    """Accepted and ignored: this server stores nothing."""
    metadata: dict[str, str] | None = None
    """Accepted and ignored (OpenAI keeps it with stored completions)."""
    service_tier: str | None = None
    """Accepted and ignored: one tier."""
    safecode: SafeCoDeRequestSettings | None = None

    @field_validator("messages")
    @classmethod
    def _roles(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        allowed = {"system", "developer", "user", "assistant", "tool"}
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in allowed:
                raise ValueError(f"messages[{i}].role is {role!r}; use one of {sorted(allowed)}.")
        return messages

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("Give max_tokens or max_completion_tokens, not both with different values.")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true.")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def format(self) -> dict[str, Any] | None:
        """`response_format`, with OpenAI's default `{"type": "text"}` as None (plain text)."""
        return None if self.response_format == {"type": "text"} else self.response_format

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's decoding options as `SamplingParams` (`SafeCoDeInputError` naming a bad field).

        OpenAI's `temperature` both sets the temperature and asks for sampling
        (0 or none: greedy decoding, this server's default)."""
        fields = {
            "max_new_tokens": self.token_limit if self.token_limit is not None else default_max_tokens,
            "do_sample": bool(self.temperature) or None, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "min_tokens": self.min_tokens,
            "repetition_penalty": self.repetition_penalty, "stop": self.stop, "seed": self.seed,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
        }
        try:
            return SamplingParams.build(**fields)
        except SafeCoDeInputError as exc:
            if exc.param == "max_new_tokens":  # the request's own name for it
                exc.param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise

    @property
    def constrained(self) -> bool:
        """The answer is decoded under a grammar: `response_format` JSON, or a forced tool call
        (`tool_choice` "required" or a named function). Under an unsafe verdict such an answer is a
        refusal instead, sent as `message.refusal` with `content` null (OpenAI's structured-output shape)."""
        if isinstance(self.response_format, dict) and self.response_format.get("type") in ("json_schema", "json_object"):
            return True
        return bool(self.tools) and (self.tool_choice in ("required", "any") or isinstance(self.tool_choice, dict))


# --------------------------------------------------------------------------- responses


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


#: An extension on a choice, present only when true: `max_tokens` was about to cut a constrained answer
#: and its grammar's shortest completion ended it (complete and valid; `SafeCoDeConfig.close_constrained`).
_CLOSED_EARLY = Field(None, exclude_if=lambda v: v is None)


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None
    closed_early: bool | None = _CLOSED_EARLY


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None
    safety: dict[str, Any]


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None
    closed_early: bool | None = _CLOSED_EARLY


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    safety: dict[str, Any] | None = None

    def sse(self) -> str:
        """One server-sent event; `safety` and `usage` only where they are set."""
        return "data: " + self.model_dump_json(exclude_none=True) + "\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "safecode-guard"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
