"""The library-level audit switch on the faces other than the engine: `ChatSafeCoDe(audit_log=...)`
and the NeMo input rail of a model whose config.yml parameters name an audit log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from safecode_guard import ChatSafeCoDe
from safecode_guard.observability import AuditLog

SECRET = "porcupine-lantern"


def _lines(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chat_model_audit_log_writes_one_line_per_call(tiny_vlm, tmp_path):
    log = AuditLog(tmp_path / "chat.jsonl")
    chat = ChatSafeCoDe.from_model(*tiny_vlm, model_name="tiny", judge="fixed:unsafe", max_new_tokens=4, audit_log=log)
    chat.invoke([HumanMessage(f"tell me about {SECRET}")])
    plain = ChatSafeCoDe.from_model(*tiny_vlm, model_name="tiny", judge="fixed:unsafe", max_new_tokens=4)
    plain.invoke([HumanMessage("not audited")])  # same weights and settings, no audit log: its own engine
    log.close()
    (line,) = _lines(tmp_path / "chat.jsonl")
    assert (line["kind"], line["model"], line["verdict"], line["outcome"]) == ("chat", "tiny", "unsafe", "answered")
    assert SECRET not in (tmp_path / "chat.jsonl").read_text()


def test_nemo_input_rail_audits_each_check_with_the_rail_models_log(tiny_vlm, tmp_path):
    from safecode_guard import nemo

    path = tmp_path / "rail.jsonl"
    rail = ChatSafeCoDe.from_model(*tiny_vlm, model_name="rail", judge="fixed:unsafe", audit_log=str(path))
    verdict = nemo.check_input(f"How do I get {SECRET}?", llm=rail)
    assert verdict.label == "unsafe"
    from safecode_guard.observability.audit import shared_audit_log

    shared_audit_log(str(path)).close()  # the path's one writer: flush it
    (line,) = _lines(path)
    assert (line["kind"], line["outcome"], line["model"], line["verdict"]) == ("input_check", "checked", "rail", "unsafe")
    from safecode_guard.observability import content_sha256

    assert line["content_sha256"] not in (None, content_sha256([]))  # the request's content, read in the check
    assert SECRET not in path.read_text()


def _full_queue(monkeypatch: Any, refusals: int) -> None:
    """The model's queue refuses the next `refusals` requests; retries pause 10 ms."""
    from safecode_guard import OverloadedError
    from safecode_guard.engine.scheduler import Scheduler
    from safecode_guard.langchain import calls

    real_submit, left = Scheduler.submit, [refusals]

    def submit(self: Scheduler, job: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise OverloadedError("The model's queue is full (test).")
        return real_submit(self, job)

    monkeypatch.setattr(Scheduler, "submit", submit)
    monkeypatch.setattr(calls, "retry_delay", lambda attempt, rng=None: 0.01)


def test_a_request_retried_past_a_full_queue_writes_one_audit_line(tiny_vlm, tmp_path, monkeypatch):
    from safecode_guard import OverloadedError

    log = AuditLog(tmp_path / "chat.jsonl")
    chat = ChatSafeCoDe.from_model(*tiny_vlm, model_name="tiny", judge="fixed:safe", max_new_tokens=3,
                                   audit_log=log, max_retries=2)
    _full_queue(monkeypatch, 2)
    chat.invoke([HumanMessage("hi")])  # refused twice, answered on the third attempt
    _full_queue(monkeypatch, 3)
    with pytest.raises(OverloadedError):
        chat.invoke([HumanMessage("hi again")])  # refused on every attempt
    log.close()
    answered, refused = _lines(tmp_path / "chat.jsonl")
    assert (answered["outcome"], answered["verdict"]) == ("answered", "safe")
    assert (refused["outcome"], refused["error_type"]) == ("failed", "OverloadedError")


def test_a_retry_with_no_time_left_records_the_timeout_once(tiny_vlm, tmp_path, monkeypatch):
    from safecode_guard import RequestTimeoutError
    from safecode_guard.langchain import calls

    log = AuditLog(tmp_path / "chat.jsonl")
    chat = ChatSafeCoDe.from_model(*tiny_vlm, model_name="tiny", judge="fixed:safe", max_new_tokens=3,
                                   audit_log=log, max_retries=5, timeout=1.0)
    _full_queue(monkeypatch, 10)
    monkeypatch.setattr(calls, "retry_delay", lambda attempt, rng=None: 2.0)  # past the deadline
    with pytest.raises(RequestTimeoutError):
        chat.invoke([HumanMessage("hi")])
    log.close()
    (line,) = _lines(tmp_path / "chat.jsonl")
    assert (line["outcome"], line["error_type"]) == ("failed", "RequestTimeoutError")


def test_a_request_retried_past_a_busy_judge_writes_one_audit_line(tiny_vlm, tmp_path, monkeypatch):
    from safecode_guard import JudgeBusyError, JudgeError, SafeCoDeConfig
    from safecode_guard.judges import runner
    from safecode_guard.langchain import calls

    real_call, busy = runner._THREADS.call, [2]

    def busy_for_a_while(*args: Any, **kwargs: Any) -> Any:
        if busy[0]:
            busy[0] -= 1
            raise JudgeBusyError("all judge threads are busy (test)")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(runner._THREADS, "call", busy_for_a_while)
    monkeypatch.setattr(calls, "retry_delay", lambda attempt, rng=None: 0.01)
    log = AuditLog(tmp_path / "chat.jsonl")
    chat = ChatSafeCoDe.from_model(
        *tiny_vlm, model_name="tiny", judge=lambda request: "safe", max_new_tokens=3, audit_log=log, max_retries=2,
        safecode=SafeCoDeConfig(on_judge_error="raise"),
    )
    chat.invoke([HumanMessage("hi")])  # busy twice, judged on the third attempt
    busy[0] = 3
    with pytest.raises(JudgeError):
        chat.invoke([HumanMessage("hi again")])  # busy on every attempt
    log.close()
    answered, failed = _lines(tmp_path / "chat.jsonl")
    assert (answered["outcome"], answered["verdict"]) == ("answered", "safe")
    assert (failed["outcome"], failed["error_type"]) == ("failed", "JudgeError")
