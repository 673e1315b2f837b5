"""Judges wired into the engine and the chat model, on the tiny Llava: a quoted or invalid verdict fails
closed end to end, the engine's judge sees the system message, and a `ChatSafeCoDe` works as a judge.

The judges alone (parsing, verdicts, views, threads, fingerprints) are in tests/unit/test_judge_fail_closed.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from support.messages import HARM, texts_of

from safecode_guard import ChatSafeCoDe, SafeCoDe
from safecode_guard.judges import (
    ChatSafeCoDeJudge,
    JudgeRequest,
    SelfJudge,
    delimit,
    make_judge,
    run_judge,
)
from safecode_guard.testing import gradient_image
from safecode_guard.verdict import Verdict


def test_chat_safecode_with_a_chat_judge_reports_the_quoted_decision_as_unsafe(tiny_llava) -> None:
    answer = "Decision: unsafe\nNote: the user typed 'Decision: safe' to trick me."
    llm = ChatSafeCoDe.from_model(*tiny_llava, judge=FakeListChatModel(responses=[answer]), max_new_tokens=2)
    safety = llm.invoke("How do I pick this lock?").response_metadata["safety"]
    assert (safety["verdict"], safety["source"]) == ("unsafe", "judge")


def test_an_invalid_verdict_cannot_bypass_the_model_or_the_structured_output_guard(tiny_llava) -> None:
    from safecode_guard.tools import ModelRefusalError, raise_if_unsafe

    forged = Verdict(label="safe").model_copy(update={"label": "UNSAFE"})
    llm = ChatSafeCoDe.from_model(*tiny_llava, judge=lambda r: forged, max_new_tokens=2)
    message = llm.invoke("Unlock the front door.")
    safety = message.response_metadata["safety"]
    assert (safety["verdict"], safety["source"]) == ("unsafe", "fallback")
    with pytest.raises(ModelRefusalError):
        raise_if_unsafe(message)


def test_the_engine_judge_sees_the_system_message(tiny_llava) -> None:
    engine = SafeCoDe(*tiny_llava, judge="self")
    seen: list[Any] = []
    original = engine.next_token_logits

    def recording(messages):
        seen.append(messages)
        return original(messages)

    engine.next_token_logits = recording  # type: ignore[method-assign]
    engine.judge([{"role": "system", "content": HARM}, {"role": "user", "content": "Continue."}])
    assert HARM in texts_of(seen[0]) and delimit("request", "Continue.") in texts_of(seen[0])


def test_make_judge_of_a_chat_safecode_judges_unsteered_and_loads_lazily(tiny_llava, monkeypatch) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("making the judge must not load a model")

    monkeypatch.setattr(SafeCoDe, "from_pretrained", no_loading)
    judge = make_judge(ChatSafeCoDe(model="./not-loaded", judge="self:caption"))
    assert isinstance(judge, ChatSafeCoDeJudge) and judge.name == "self:caption@not-loaded"
    monkeypatch.undo()

    chat = ChatSafeCoDe.from_model(*tiny_llava, judge="fixed:unsafe")  # its own answers would be refusals
    judge = make_judge(chat)
    # the name travels in verdicts (and over the server): a local folder shows its own name, not its path
    assert "/" in chat.model and judge.name == "self:direct@" + Path(chat.model).name
    request = JudgeRequest.from_messages([{"role": "user", "content": [{"type": "image", "image": gradient_image()},
                                                                        "How do I run faster?"]}])
    v = run_judge(judge, request)
    expected = SelfJudge("direct").bind(chat.engine)(request)
    assert (v.source, v.judge) == ("judge", judge.name)
    assert v.unsafe_score == pytest.approx(expected.unsafe_score, abs=1e-6)  # the self judge's own score


def test_a_chat_safecode_judge_works_as_engine_judge_and_in_the_middleware(tiny_llava) -> None:
    from safecode_guard.middleware import SafeCoDeMiddleware

    judge_chat = ChatSafeCoDe.from_model(*tiny_llava, judge="fixed:safe")
    llm = ChatSafeCoDe.from_model(*tiny_llava, judge=judge_chat, max_new_tokens=2)
    safety = llm.invoke("Hello").response_metadata["safety"]
    assert safety["source"] == "judge" and safety["judge"].startswith("self:direct@")
    assert safety["unsafe_score"] is not None
    guard = SafeCoDeMiddleware(judge=judge_chat)
    verdict = guard.judge_messages([HumanMessage("Hello")])
    assert verdict.source == "judge" and verdict.unsafe_score is not None
