"""`SafeCoDeLLMAdapter`: NeMo's LangChain adapter, with SafeCoDe's verdict, errors and served name on its answers."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter

from ..control import arun_briefly
from ..errors import (
    SafeCoDeError,
    SafeCoDeInputError,
)
from ..langchain.messages import to_hf_messages
from ..verdict import Verdict
from .settings import ENGINE_NAME, check_request_options, served_model_name

if TYPE_CHECKING:
    from nemoguardrails.types import LLMResponse, LLMResponseChunk

    from ..langchain.chat_model import ChatSafeCoDe


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the adapter

_CHECK_TASK_HINT = "check"
# The rail's verdict, handed by `safecode_generate` to the model call it makes (same task).
RAIL_VERDICT: contextvars.ContextVar[Verdict | None] = contextvars.ContextVar(
    "safecode_rail_verdict", default=None
)


def _current_task() -> str | None:
    """The NeMo task of the model call being made (`llm_call_info.task`), or None outside a task."""
    from nemoguardrails.context import llm_call_info_var

    info = llm_call_info_var.get()
    return getattr(info, "task", None) if info is not None else None


def is_check_task(task: str | None) -> bool:
    """Whether a NeMo task is one of NeMo's own checks (`self_check_input`, `content_safety_check_input ...`).

    Those prompts are NeMo's, not the user's: judging and steering them would
    judge the check instead of the request. Every other call, including
    NeMo's dialog tasks whose output may reach the user, is steered.
    """
    return task is not None and _CHECK_TASK_HINT in task


class SafeCoDeLLMAdapter(LangChainLLMAdapter):
    """NeMo's `LangChainLLMAdapter` for a `ChatSafeCoDe`, with the limits of a model that serves requests.

    - Request options are limited to `REQUEST_OPTIONS` (`RequestOptionError`
      otherwise): NeMo forwards a request's `llm_params` verbatim, so a
      client could otherwise pass `verdict` or `model`. `allow_verdict=True`
      is for library callers who steer with verdicts of their own.
    - The verdict `safecode_generate` hands on reaches the call as `verdict`.
    - NeMo's own check calls (`is_check_task`) get plain decoding
      (`SafeCoDe.baseline`) capped at the chat model's `max_new_tokens`, and
      no `safety` metadata, so `llm_metadata["safety"]` is the answer's.
    - `model_name` is the served name, so NeMo's logs and errors never show
      a local path; a model that fails to load is reported without its path.
    """

    def __init__(self, llm: ChatSafeCoDe, *, served_name: str | None = None, allow_verdict: bool = False) -> None:
        super().__init__(llm)
        self._served_name = served_name or served_model_name(llm.model)
        self._allow_verdict = allow_verdict

    @property
    def model_name(self) -> str:
        return self._served_name

    @property
    def provider_name(self) -> str:
        return ENGINE_NAME

    @property
    def provider_url(self) -> None:
        return None

    def _prepare_call_params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        check_request_options(kwargs, allow_verdict=self._allow_verdict)
        params = dict(kwargs)
        if stop is not None:
            params["stop"] = stop
        verdict = RAIL_VERDICT.get()
        if verdict is not None:
            params["verdict"] = verdict
        return params

    async def _load(self) -> None:
        """Load the engine now (once), reporting a failure without the local path it names."""

        chat = self._llm
        try:
            await arun_briefly(lambda: chat.engine)
        except Exception as exc:
            log.error("Loading the safecode model %r failed: %s", chat.model, exc, exc_info=exc)
            raise SafeCoDeError(
                f"The model {self._served_name!r} could not be loaded; the server log has the reason."
            ) from None

    async def _plain(self, prompt: Any, params: dict[str, Any]) -> Any:
        """Plain decoding of a NeMo check prompt: no judge, no steering, at most `max_new_tokens` tokens."""
        from langchain_core.messages import HumanMessage


        chat = self._llm
        params = {k: v for k, v in params.items() if k != "verdict"}
        stop = params.pop("stop", None)
        messages = self._to_langchain_input(prompt)
        if isinstance(messages, str):
            messages = [HumanMessage(content=messages)]

        def run() -> Any:
            _, settings = chat._call_settings(stop, params)
            settings.pop("verdict", None)
            settings["max_new_tokens"] = min(settings["max_new_tokens"], chat.max_new_tokens)
            return chat.engine.baseline(to_hf_messages(messages, chat.policy), **settings)

        return await asyncio.to_thread(run)

    async def generate_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> LLMResponse:
        from nemoguardrails.types import LLMResponse, UsageInfo

        with _client_errors():
            params = self._prepare_call_params(stop, kwargs)
            await self._load()
            if is_check_task(_current_task()):
                result = await self._plain(prompt, params)
                usage = result.usage
                return LLMResponse(
                    content=result.text,
                    model=self._served_name,
                    finish_reason=result.finish_reason,
                    usage=UsageInfo(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                )
            response = await super().generate_async(prompt, stop=stop, **kwargs)
        response.model = self._served_name
        response.provider_metadata = _with_message_fields(response, self._served_name)
        return response

    async def stream_async(
        self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[LLMResponseChunk]:
        from nemoguardrails.types import LLMResponseChunk

        with _client_errors():
            params = self._prepare_call_params(stop, kwargs)
            await self._load()
            if is_check_task(_current_task()):
                result = await self._plain(prompt, params)
                yield LLMResponseChunk(
                    delta_content=result.text, model=self._served_name, finish_reason=result.finish_reason
                )
                return
            async for chunk in super().stream_async(prompt, stop=stop, **kwargs):
                if chunk.model:
                    chunk.model = self._served_name
                yield chunk


def _with_message_fields(response: LLMResponse, served: str) -> dict[str, Any] | None:
    """The response's provider metadata plus `response_metadata` and `usage_metadata` for a LangChain message.

    NeMo hands the metadata of the last model call to `RunnableRails`, which
    builds its `AIMessage` from the keys that are `AIMessage` fields and drops
    the rest: these two keys carry the answer's `safety` dict and token usage
    through, as `ChatSafeCoDe` itself returns them.
    """
    metadata = dict(response.provider_metadata or {})
    if "safety" not in metadata:
        return response.provider_metadata
    metadata["response_metadata"] = {
        "safety": metadata["safety"],
        "model_name": served,
        "model_provider": metadata.get("model_provider", ENGINE_NAME),
        "finish_reason": response.finish_reason,
    }
    if response.usage is not None:
        usage = response.usage
        metadata["usage_metadata"] = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        }
    return metadata


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """Mark errors about the request itself (bad options, images, limits) as HTTP 400 for NeMo's server.

    NeMo's server answers a failed model call with the `status_code` of its
    cause, and 500 without one; a `SafeCoDeInputError` is the client's to fix.
    """
    try:
        yield
    except SafeCoDeInputError as exc:
        if getattr(exc, "status_code", None) is None:
            exc.status_code = 400  # type: ignore[attr-defined]
        raise


