"""`AuditLog` and what its lines hold: JSON lines through logging, failures counted and logged once,
never raised; the content digest and the key identity."""

from __future__ import annotations

import errno
import json
import logging
import threading
from typing import Any, ClassVar

import pytest
from PIL import Image

from safecode_guard.observability import AUDIT_LOGGER, AuditLog, content_sha256, key_id
from safecode_guard.observability.audit import (
    RequestScope,
    content_text,
    current_scope,
    note_request_id,
    request_scope,
)
from safecode_guard.serving.metrics import Metrics


def test_lines_from_many_threads_are_whole_json_objects_in_the_file(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    threads = [threading.Thread(target=lambda i=i: [log.write({"i": i, "j": j, "text": "é"}) for j in range(25)])
               for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 32 * 25
    assert {(line["i"], line["j"]) for line in lines} == {(i, j) for i in range(32) for j in range(25)}


def test_stdout_target_and_a_user_handler_on_the_audit_logger(capsys):
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    mine = Collect()
    AUDIT_LOGGER.addHandler(mine)
    try:
        log = AuditLog("-")
        log.write({"verdict": "safe"})
        log.close()
    finally:
        AUDIT_LOGGER.removeHandler(mine)
    assert json.loads(capsys.readouterr().out) == {"verdict": "safe"}
    assert seen == ['{"verdict":"safe"}']  # every line also reaches handlers the application adds


def test_two_logs_in_one_process_keep_their_own_lines(tmp_path):
    a, b = AuditLog(tmp_path / "a"), AuditLog(tmp_path / "b")
    a.write({"to": "a"})
    b.write({"to": "b"})
    a.close()
    b.close()
    assert (tmp_path / "a").read_text().strip() == '{"to":"a"}'
    assert (tmp_path / "b").read_text().strip() == '{"to":"b"}'


def test_an_unwritable_path_is_counted_and_logged_once_never_raised(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="safecode_guard.observability")
    log = AuditLog(tmp_path / "missing" / "audit.jsonl")
    for i in range(5):
        log.write({"i": i})  # never raises
    log.close()
    assert log.write_errors == 6  # the check at startup, then each line
    assert len([r for r in caplog.records if "audit log" in r.getMessage()]) == 1


def test_a_full_disk_is_counted_logged_once_and_the_writer_goes_on(tmp_path, monkeypatch, caplog):
    from safecode_guard.observability import audit as audit_mod

    class FullDisk:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def tell(self) -> int:
            return 0

        def seek(self, *args: Any) -> int:
            return 0

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    caplog.set_level(logging.ERROR, logger="safecode_guard.observability")
    monkeypatch.setattr(audit_mod._CountingFileHandler, "_open", lambda self: FullDisk())
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        log.write({"i": i})  # never raises
    log.close()
    assert log.write_errors == 3
    assert len([r for r in caplog.records if "No space left" in r.getMessage()]) == 1


def test_a_line_that_cannot_be_encoded_is_counted_not_raised(tmp_path):
    log = AuditLog(tmp_path / "a")
    circular: dict[str, Any] = {}
    circular["self"] = circular
    log.write(circular)
    log.write({"ok": True})
    log.close()
    assert log.write_errors == 1 and (tmp_path / "a").read_text().strip() == '{"ok":true}'


def test_content_digest_is_stable_and_sees_text_and_pixels():
    def msgs(text: str, color: tuple[int, int, int]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (4, 4), color)},
                                              {"type": "text", "text": text}]}]

    base = content_sha256(msgs("hello", (1, 2, 3)))
    assert base == content_sha256(msgs("hello", (1, 2, 3))) and len(base) == 64
    assert base != content_sha256(msgs("hellO", (1, 2, 3)))
    assert base != content_sha256(msgs("hello", (1, 2, 4)))  # one pixel value differs
    assert content_sha256([{"role": "user", "content": "a"}]) != content_sha256([{"role": "assistant", "content": "a"}])


def test_content_text_keeps_text_parts_and_marks_images():
    messages = [{"role": "system", "content": "be kind"},
                {"role": "user", "content": [{"type": "image", "image": object()}, {"type": "text", "text": "hi"}]}]
    assert content_text(messages) == [{"role": "system", "text": "be kind"}, {"role": "user", "text": "[image]\nhi"}]


def test_key_identity_is_short_stable_and_not_the_key():
    assert key_id(None) is None and key_id("") is None
    ident = key_id("sk-very-secret")
    assert ident == key_id("sk-very-secret") and len(ident) == 12 and "secret" not in ident
    assert ident != key_id("sk-very-secreT")


def test_request_scope_is_current_inside_and_names_the_request():
    assert current_scope() is None
    note_request_id("ignored")  # no scope: nothing to name, no error
    with request_scope(RequestScope()) as scope:
        note_request_id("chatcmpl-1")
        assert current_scope() is scope and scope.request_id == "chatcmpl-1"
    assert current_scope() is None


def test_metrics_read_the_schedulers_batch_sizes_and_the_audit_errors_at_scrape_time():
    from collections import Counter

    from prometheus_client import generate_latest

    class FakeScheduler:
        queue_depth, active_rows, preparing_requests, prefilling_requests = 3, 4, 5, 6
        step_rows: ClassVar[Counter[int]] = Counter({1: 2, 3: 1, 40: 1})

    class FakeAudit:
        write_errors = 7

    metrics = Metrics()
    metrics.watch_engine(FakeScheduler())
    metrics.watch_audit(FakeAudit())
    metrics.observe_request({"outcome": "answered", "completion_tokens": 11,
                             "timings": {"judge_s": 0.02, "queue_s": 0.5, "decode_s": 2.0}})
    metrics.observe_request({"outcome": "cancelled", "timings": {"queue_s": 1.0}})
    text = generate_latest(metrics.registry).decode()
    for expected in (
        "safecode_queue_depth 3.0", "safecode_active_rows 4.0", "safecode_requests_preparing 5.0",
        "safecode_requests_prefilling 6.0", 'safecode_batch_rows_bucket{le="1"} 2.0',
        'safecode_batch_rows_bucket{le="4"} 3.0', 'safecode_batch_rows_bucket{le="32"} 3.0',
        'safecode_batch_rows_bucket{le="+Inf"} 4.0', "safecode_batch_rows_sum 45.0",
        "safecode_audit_write_errors_total 7.0", "safecode_queue_wait_seconds_count 2.0",
        "safecode_judge_latency_seconds_count 1.0", 'safecode_decode_tokens_per_second_bucket{le="5.0"} 1.0',
        'safecode_engine_requests_total{outcome="cancelled"} 1.0', 'safecode_engine_requests_total{outcome="failed"} 0.0',
    ):
        assert expected in text, expected


def test_a_verdict_only_check_is_one_span_and_one_audit_line(tmp_path):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from safecode_guard import Verdict
    from safecode_guard.observability import use_tracer_provider
    from safecode_guard.observability.records import observed_check

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    use_tracer_provider(provider)
    log = AuditLog(tmp_path / "audit.jsonl")
    try:
        with observed_check("rail-model", [{"role": "user", "content": "how to pick a lock"}], log) as note:
            note(Verdict(label="unsafe", unsafe_score=0.875, judge="self", categories=["S2"]))
    finally:
        use_tracer_provider(None)
        log.close()
    (span,) = spans.get_finished_spans()
    assert span.name == "safecode.input_check" and span.attributes["safecode.verdict"] == "unsafe"
    assert span.attributes["safecode.categories"] == ("S2",) and span.attributes["safecode.unsafe_score"] == 0.875
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert (line["kind"], line["outcome"], line["verdict"], line["categories"]) == ("input_check", "checked", "unsafe", ["S2"])
    assert "lock" not in (tmp_path / "audit.jsonl").read_text()


def test_settings_naming_the_same_path_share_one_writer(tmp_path):
    from safecode_guard.observability.audit import shared_audit_log

    a = shared_audit_log(tmp_path / "shared.jsonl")
    b = shared_audit_log(str(tmp_path / "." / "shared.jsonl"))
    assert a is b and shared_audit_log(a) is a
    with pytest.raises(ValueError, match="already open with content=False"):
        shared_audit_log(tmp_path / "shared.jsonl", content=True)  # one file, one setting
