"""One started call, the conversation checks before it, and its deadline and retries."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage

from .. import calls
from ..control import RequestControl, current_control
from ..errors import JudgeBusyError, JudgeError, OverloadedError
from ..observability.records import held_failures
from ..verdict import Verdict
from . import tools as tools_mod

if TYPE_CHECKING:
    from ..engine.results import SafeCoDeStream

@dataclass
class Call(calls.Call):
    """One started call (`safecode_guard.calls.Call`) and the model name LangChain reports for it."""

    model_name: str = ""
    """What `response_metadata["model_name"]` reports (`ChatSafeCoDe.model_name` or the override's name)."""


def merge_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive same-role turns as one turn, as the engine merges them before rendering.

    Tool results and tool-calling turns stay apart (each answers or makes its own calls).
    """
    merged: list[dict[str, Any]] = []
    for m in messages:
        plain = set(m) <= {"role", "content"}
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool" and plain and len(merged[-1]) == 2:
            # in place, on the copy made below: linear in the turns, never a copy per turn
            merged[-1]["content"].extend([{"type": "text", "text": "\n"}, *m["content"]])
        else:
            merged.append({**m, "content": list(m["content"])} if isinstance(m.get("content"), list) else dict(m))
    return merged


def check_conversation(messages: Sequence[BaseMessage]) -> None:
    """Bound the nesting of what a conversation carries (`InputLimitError`), before any walk over it."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, str):
            tools_mod.check_nesting(message.content, f"messages[{i}].content")
        for j, call in enumerate(getattr(message, "tool_calls", None) or []):
            tools_mod.check_nesting(call.get("args"), f"The arguments of messages[{i}].tool_calls[{j}] ({call.get('name')!r})")


def refused_already(messages: Sequence[BaseMessage]) -> AIMessage | None:
    """The last message when it is an answer this model gave under an unsafe verdict."""
    last = messages[-1] if messages else None
    if isinstance(last, AIMessage) and (last.response_metadata.get("safety") or {}).get("verdict") == "unsafe":
        return last
    return None


# --------------------------------------------------------------------------- retries and the deadline


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first): 0.25 s doubling up to
    4 s, with +-25% jitter so that callers refused together do not come back together."""
    return min(4.0, 0.25 * 2**attempt) * (rng or random).uniform(0.75, 1.25)


def busy_judge(verdict: Verdict | None) -> bool:
    """Whether `verdict` is a fallback decided because every judge thread was busy (`JudgeBusyError`)."""
    return verdict is not None and verdict.source == "fallback" and (verdict.error or "").startswith("JudgeBusyError")


class Retry:
    """One call's deadline, and its retries of what a local model fails for a moment.

    The deadline is a `RequestControl` handed to every engine call, so it
    bounds the judge, the queue, the prefill and decoding alike, and
    retries with their pauses too (a call made inside another request, e.g.
    by a judge, also ends with that request). Retried: a judge that found
    every judge thread busy (`JudgeBusyError`, raised under
    `on_judge_error="raise"` or decided as a fallback verdict) and a full
    queue (`OverloadedError`). Each retry waits `retry_delay(attempt)`; a
    wait that would end past the deadline raises `RequestTimeoutError`
    instead. The last attempt's result (a fallback verdict included) stands.
    """

    def __init__(self, max_retries: int, timeout: float | None) -> None:
        self.max_retries = max_retries
        source = f"ChatSafeCoDe(timeout={timeout:g})" if timeout is not None else "timeout_s"
        self.control = RequestControl(timeout, parent=current_control(), source=source)
        self.attempt = 0

    def left(self) -> dict[str, Any]:
        """The engine's keyword arguments that put a call under this deadline."""
        return {"control": self.control}

    def _pause(self, cause: BaseException | str) -> None:
        wait = retry_delay(self.attempt)
        self.attempt += 1
        remaining = self.control.remaining()
        if remaining is not None and wait >= remaining:
            raise self.control.timeout_error(f"no time was left to retry after: {cause}") from (
                cause if isinstance(cause, BaseException) else None
            )
        self.control.wait(threading.Event(), wait)  # wakes (and raises) if the request is cancelled

    def judged(self, open_stream: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        """`open_stream()` (which judges), again while a busy judge decided its verdict."""
        while True:
            with held_failures() as held:  # an attempt asked again writes no audit line of its own
                try:
                    pieces = open_stream()
                except JudgeError as exc:
                    if self.attempt >= self.max_retries or not isinstance(exc.__cause__, JudgeBusyError):
                        raise
                    try:
                        self._pause(exc.__cause__)
                    except BaseException as stop:  # no time left (or cancelled): the request ends here
                        held.failed(stop)
                        raise
                    held.superseded()
                    continue
            if self.attempt >= self.max_retries or not busy_judge(pieces.verdict):
                return pieces
            pieces.close()  # never queued
            self._pause(str(pieces.verdict.error))

    def queued(self, pieces: SafeCoDeStream, reopen: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        """`pieces` queued for decoding; reopened with `reopen()` and queued again while the queue is full."""
        while True:
            try:
                return pieces.start(retry_follows=self.attempt < self.max_retries)
            except OverloadedError as exc:
                if self.attempt >= self.max_retries:
                    raise  # recorded by `start`
                try:
                    self._pause(exc)
                except BaseException as stop:  # no time left (or cancelled): this attempt is the request's last
                    pieces.abandon(stop)
                    raise
                pieces.abandon()  # superseded: the next attempt writes the request's one audit line
                pieces = reopen()


