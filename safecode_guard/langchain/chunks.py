"""Engine text pieces as LangChain chunks (`safety` first, accounting last), and the answer check's replacement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCallChunk
from langchain_core.outputs import ChatGenerationChunk

from ..config import SafeCoDeConfig
from ..control import arun_briefly, run_briefly
from ..ops import refusal_decision
from ..verdict import Verdict, answer_check_metadata, safety_metadata
from . import tools as tools_mod
from .calls import Call
from .settings import PROVIDER
from .tool_calls import AnswerReader, CallPlan

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
    """Engine text pieces as LangChain chunks: `safety` on the first, the accounting on the last.

    Text is held back only until `refusal_decision` can fill `safety["refused"]`.
    With tools bound, an `AnswerReader` turns the text into content and one
    `tool_call_chunks` chunk per finished call. On the last chunk: calls
    blocked by an unsafe verdict (`safety["blocked_tool_calls"]`) and why each
    invalid call is invalid (`response_metadata[INVALID_CALL_ERRORS]`). The
    same builder serves the sync and the async paths, so they cannot differ.
    """

    def __init__(self, call: Call) -> None:
        self.call = call
        self.reader = AnswerReader(call.plan, unsafe=call.verdict.label == "unsafe")
        self.pending = self.reader.feed(call.plan.prefix) if call.plan is not None else []
        self.held = ""
        self.refused: bool | None = None

    def feed(self, piece: str) -> list[ChatGenerationChunk]:
        call = self.call
        self.pending.extend(self.reader.feed(piece))
        if self.refused is None:
            self.held += piece
            self.refused = refusal_decision(self.held, call.engine.config.refusal_phrases)
            if self.refused is None:
                return []
            first = _first_chunk(self.pending, call.verdict, call.engine.config, self.refused, call.plan)
            self.pending = []
            return [first]
        out = [_chunk(text, calls) for text, calls in self.pending]
        self.pending = []
        return out

    def finish(self, answer_check: Verdict | None = None) -> list[ChatGenerationChunk]:
        call, reader = self.call, self.reader
        self.pending.extend(reader.finish())
        result = call.pieces.result
        assert result is not None
        out: list[ChatGenerationChunk] = []
        if self.refused is None:  # the answer ended before its opening decided (e.g. an empty answer)
            out.append(_first_chunk(self.pending, call.verdict, call.engine.config, result.refused, call.plan))
            self.pending = []
        out += [_chunk(text, calls) for text, calls in self.pending]
        last_meta: dict[str, Any] = {"model_name": call.model_name, "finish_reason": result.finish_reason}
        if reader.blocked:
            # merged into the first chunk's `safety` dict (LangChain merges nested dicts key by key)
            last_meta["safety"] = {"blocked_tool_calls": reader.blocked}
        if answer_check is not None:
            # the text is out already: flagged here; `invoke` replaces it (`replace_unsafe_answer`)
            last_meta.setdefault("safety", {})["answer_check"] = answer_check_metadata(answer_check, replaced=False)
        if reader.errors:
            last_meta[tools_mod.INVALID_CALL_ERRORS] = dict(reader.errors)
        out.append(
            ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    chunk_position="last",
                    response_metadata=last_meta,
                    usage_metadata=usage_metadata(result),
                )
            )
        )
        return out


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


def _chunk(text: str, calls: list[ToolCallChunk]) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))


def _first_chunk(
    pending: list[tuple[str, list[ToolCallChunk]]],
    verdict: Verdict,
    config: SafeCoDeConfig,
    refused: bool,
    plan: CallPlan | None,
) -> ChatGenerationChunk:
    safety = safety_metadata(verdict, config, refused)
    if plan is not None and plan.names is not None:
        safety["blocked_tool_calls"] = []
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="".join(text for text, _ in pending),
            tool_call_chunks=[c for _, calls in pending for c in calls],
            response_metadata={"safety": safety, "model_provider": PROVIDER},
        )
    )


