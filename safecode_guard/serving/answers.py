"""A call's events as one OpenAI answer: text, tool calls, finish reason, logprobs, the `safety` object.

A non-streamed answer is not shown until it is whole, so an answer the
answer check found unsafe is replaced by the refusal here (its tool calls
move to `safety["blocked_tool_calls"]`, and `answer_check["replaced"]` says
so); a streamed one was shown already and only flags it (`app`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..calls import Event
from ..engine.results import SafeCoDeResult
from .protocol import ChoiceLogprobs, FunctionCall, TokenLogprob, ToolCall, TopLogprob

__all__ = ["Answer", "chain", "collect", "merged", "wire_logprobs"]


@dataclass
class Answer:
    """One whole answer, as a non-streamed choice shows it."""

    text: str
    tool_calls: list[ToolCall]
    finish_reason: str
    safety: dict[str, Any]
    result: SafeCoDeResult
    deltas: list[dict[str, Any]] = field(default_factory=list)


async def chain(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`first`, then the events of `rest` (an answer whose first event was awaited already)."""
    yield first
    async for event in rest:
        yield event


async def merged(streams: list[AsyncIterator[Event]]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several choices as they come, each with its choice's index. The first failure
    is raised (the other choices stop); leaving early stops them all."""
    queue: asyncio.Queue[tuple[int, Event | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                await queue.put((index, event, None))
            await queue.put((index, None, None))
        except BaseException as exc:
            await queue.put((index, None, exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            index, event, error = await queue.get()
            if error is not None:
                raise error
            if event is None:
                running -= 1
                continue
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _parsed(delta: dict[str, Any]) -> dict[str, Any]:
    """A call delta as the call it was (valid: its arguments as a dict; invalid: its raw text as a JSON string)."""
    args = json.loads(delta["args"])
    if isinstance(args, dict):
        return {"name": delta["name"], "args": args, "id": delta["id"], "type": "tool_call"}
    return {"name": delta["name"], "args": delta["args"], "id": delta["id"], "error": None, "type": "invalid_tool_call"}


async def collect(events: AsyncIterator[Event], refusal: str) -> Answer:
    """The whole answer of `events`; one the answer check found unsafe becomes `refusal`."""
    text, deltas, safety = [], [], {}
    result: SafeCoDeResult | None = None
    async for event in events:
        text.append(event.text)
        deltas.extend(event.calls)
        if event.first:
            safety = dict(event.safety or {})
        if event.last:
            safety.update(event.safety or {})
            result = event.result
    assert result is not None
    calls = [_parsed(d) for d in deltas]
    answer = "".join(text)
    check = safety.get("answer_check")
    if isinstance(check, dict) and check.get("verdict") == "unsafe":
        blocked = [*(safety.get("blocked_tool_calls") or []), *calls]
        safety["answer_check"] = {**check, "replaced": True}
        if blocked or "blocked_tool_calls" in safety:
            safety["blocked_tool_calls"] = blocked
        answer, calls = refusal, []
    # valid calls first, then the invalid ones, each in the order the model wrote them
    ordered = [c for c in calls if c["type"] == "tool_call"] + [c for c in calls if c["type"] != "tool_call"]
    tool_calls = [
        ToolCall(id=c["id"] or "", function=FunctionCall(
            name=c["name"] or "",
            arguments=json.dumps(c["args"], ensure_ascii=False) if c["type"] == "tool_call" else c["args"] or "",
        ))
        for c in ordered
    ]
    finish = "tool_calls" if tool_calls else result.finish_reason
    return Answer(answer, tool_calls, finish, safety, result, deltas)


def wire_logprobs(result: SafeCoDeResult | None) -> ChoiceLogprobs | None:
    """`result.logprobs` in OpenAI's `choices[].logprobs` shape (None when not asked for)."""
    if result is None or result.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(t.token, t.logprob), top_logprobs=[TopLogprob(**entry(a.token, a.logprob)) for a in t.top_logprobs])
        for t in result.logprobs
    ])
