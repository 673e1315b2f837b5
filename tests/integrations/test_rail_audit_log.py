"""The library-level audit switch on the faces other than the engine: `ChatSafeCoDe(audit_log=...)`
and the NeMo input rail of a model whose config.yml parameters name an audit log."""

from __future__ import annotations

import json
from typing import Any

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
