"""Engine text pieces as LangChain chunks (`safety` first, accounting last), and the answer check's replacement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGenerationChunk

from ..calls import CallEvents, Event
from ..control import arun_briefly, run_briefly
from ..verdict import Verdict
from . import tools as tools_mod
from .calls import Call
from .settings import PROVIDER

if TYPE_CHECKING:
    from ..engine.results import SafeCoDeResult

# --------------------------------------------------------------------------- pure helpers


def replace_unsafe_answer(message: AIMessage, refusal: str) -> AIMessage:
    """`message` with its content replaced by `refusal` when its answer check found it unsafe.

    For answers not yet shown (`invoke`, a non-streamed HTTP answer): tool calls
    go too (listed in `safety["blocked_tool_calls"]`), and `answer_check["replaced"]`
    says so. Any other message is returned as it is.
    """
    safety = message.response_metadata.get("safety") or {}
    check = safety.get("answer_check")
    if not isinstance(check, dict) or check.get("verdict") != "unsafe":
        return message
    blocked = [*(safety.get("blocked_tool_calls") or []), *map(dict, message.tool_calls), *map(dict, message.invalid_tool_calls)]
    new_safety = {**safety, "answer_check": {**check, "replaced": True}}
    if blocked or "blocked_tool_calls" in safety:
        new_safety["blocked_tool_calls"] = blocked
    return AIMessage(
        content=refusal,
        id=message.id,
        response_metadata={**message.response_metadata, "safety": new_safety},
        usage_metadata=message.usage_metadata,
    )


def usage_metadata(result: SafeCoDeResult) -> UsageMetadata:
    """LangChain usage counts from the engine's: prompt tokens of the real view, answer tokens."""
    return UsageMetadata(
        input_tokens=result.usage.prompt_tokens,
        output_tokens=result.usage.completion_tokens,
        total_tokens=result.usage.total_tokens,
    )



class ChunkBuilder:
    """A call's events (`safecode_guard.calls.CallEvents`) as LangChain chunks.

    The first chunk carries `safety` (text is held back only until the refusal
    decision is known); tool calls are one `tool_call_chunks` entry per
    finished call; the last chunk carries the accounting: the finish reason,
    usage, calls blocked by an unsafe verdict (`safety["blocked_tool_calls"]`,
    merged into the first chunk's dict), why each invalid call is invalid
    (`response_metadata[INVALID_CALL_ERRORS]`) and, when asked for, the
    answer's `logprobs` (OpenAI's shape, as `ChatOpenAI` reports them). The
    same builder serves the sync and the async paths, so they cannot differ.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.events = CallEvents(call)

    def feed(self, piece: str) -> list[ChatGenerationChunk]:
        return [self._chunk(e) for e in self.events.feed(piece)]

    def finish(self, answer_check: Verdict | None = None) -> list[ChatGenerationChunk]:
        return [self._chunk(e) for e in self.events.finish(answer_check)]

    def _chunk(self, event: Event) -> ChatGenerationChunk:
        calls = [tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=c["index"]) for c in event.calls]
        if event.first:
            meta: dict[str, Any] = {"safety": event.safety, "model_provider": PROVIDER}
            return ChatGenerationChunk(
                message=AIMessageChunk(content=event.text, tool_call_chunks=calls, response_metadata=meta)
            )
        if not event.last:
            return ChatGenerationChunk(message=AIMessageChunk(content=event.text, tool_call_chunks=calls))
        result = event.result
        assert result is not None
        last: dict[str, Any] = {"model_name": self.call.model_name, "finish_reason": event.finish_reason}
        if event.safety:
            last["safety"] = event.safety  # merged into the first chunk's `safety` (nested dicts merge key by key)
        if event.invalid_call_errors:
            last[tools_mod.INVALID_CALL_ERRORS] = dict(event.invalid_call_errors)
        if result.logprobs is not None:
            last["logprobs"] = {"content": [_logprob(t) for t in result.logprobs]}
        if result.closed_early:  # the budget ran short: the grammar's shortest completion ended the answer
            last["closed_early"] = True
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="", chunk_position="last", response_metadata=last, usage_metadata=usage_metadata(result)
            )
        )


def _logprob(entry: Any) -> dict[str, Any]:
    """One `TokenLogprob` as OpenAI (and `ChatOpenAI`'s `response_metadata["logprobs"]`) shows it."""
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "bytes": list(token.encode("utf-8")), "logprob": logprob}

    return {**one(entry.token, entry.logprob), "top_logprobs": [one(t.token, t.logprob) for t in entry.top_logprobs]}


def answer_chunks(call: Call) -> Iterator[ChatGenerationChunk]:
    builder = ChunkBuilder(call)
    for piece in call.pieces:
        yield from builder.feed(piece)
    check = None
    if call.check is not None:
        check = run_briefly(lambda: call.check(call.answer()))  # type: ignore[misc]
    yield from builder.finish(check)


async def aanswer_chunks(call: Call) -> AsyncIterator[ChatGenerationChunk]:
    builder = ChunkBuilder(call)
    async for piece in call.pieces:
        for chunk in builder.feed(piece):
            yield chunk
    check = None
    if call.check is not None:
        check = await arun_briefly(lambda: call.check(call.answer()))  # type: ignore[misc]
    for chunk in builder.finish(check):
        yield chunk
