"""The engine's spans and audit lines on a tiny real model: the span tree of a request, its
attributes, failures and cancellations, the library-level audit switch, and tracing off."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from safecode_guard import SafeCoDe, SafeCoDeConfig
from safecode_guard.observability import AuditLog, use_tracer_provider
from safecode_guard.observability.records import RequestRecord

SECRET = "marmalade-okapi"


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    use_tracer_provider(provider)
    yield spans
    use_tracer_provider(None)


def _messages(image: Any = None, text: str = f"What is {SECRET}?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": parts}]


def _tree(exporter: InMemorySpanExporter) -> tuple[Any, dict[str, Any]]:
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name.startswith("chat ")]
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    return root, children


def test_a_request_is_one_span_with_its_stages_in_order_and_genai_attributes(tiny_vlm, test_image, exporter):
    engine = SafeCoDe(*tiny_vlm, config=SafeCoDeConfig(steered_steps=3), judge="fixed:safe", model_name="tiny")
    result = engine.generate(_messages(test_image), max_new_tokens=10, stop=["never-there"], seed=7)
    root, children = _tree(exporter)
    assert root.name == "chat tiny"
    assert set(children) >= {"safecode.judge", "safecode.queue", "safecode.prefill", "safecode.window"}
    # stages follow each other on the request's own timeline, inside the request span
    order = [children[n] for n in ("safecode.queue", "safecode.prefill", "safecode.window")]
    if result.usage.completion_tokens > 3:
        order.append(children["safecode.decode"])
    for earlier, later in itertools.pairwise(order):
        assert earlier.end_time <= later.start_time + 1000  # ns: converted from the same perf_counter clock
    assert root.start_time <= children["safecode.judge"].start_time and order[-1].end_time <= root.end_time
    assert children["safecode.window"].attributes["safecode.contrastive"] is True  # real and noised rows
    a = root.attributes
    assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"]) == ("chat", "safecode_guard", "tiny")
    assert a["gen_ai.request.max_tokens"] == 10 and a["gen_ai.request.seed"] == 7
    assert a["gen_ai.request.stop_sequences"] == ("never-there",)
    assert a["gen_ai.response.finish_reasons"] == (result.finish_reason,)
    assert a["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == result.usage.completion_tokens
    assert a["safecode.verdict"] == "safe" and a["safecode.source"] == "judge" and a["safecode.steered_steps"] == 3
    assert a["safecode.refused"] == result.refused
    assert SECRET not in repr([dict(s.attributes) for s in exporter.get_finished_spans()])


async def test_async_and_text_only_requests_are_traced_too(tiny_vlm, exporter):
    engine = SafeCoDe(*tiny_vlm, config=SafeCoDeConfig(steered_steps=2), judge="fixed:unsafe")
    result = await engine.agenerate(_messages(), max_new_tokens=6)
    root, children = _tree(exporter)
    assert root.attributes["safecode.verdict"] == "unsafe" and root.attributes["safecode.refused"] == result.refused
    assert children["safecode.window"].attributes["safecode.contrastive"] is False  # no image: no noised row


def test_a_failed_judge_is_a_fallback_on_the_judge_span(tiny_vlm, test_image, exporter):
    def broken(request: Any) -> str:
        raise RuntimeError(f"backend down, it said {SECRET}")

    engine = SafeCoDe(*tiny_vlm, judge=broken)
    engine.generate(_messages(test_image), max_new_tokens=3)
    root, children = _tree(exporter)
    judge = children["safecode.judge"].attributes
    assert judge["safecode.source"] == "fallback" and judge["safecode.verdict"] == "unsafe"
    assert judge["safecode.judge_error"] == "judge_error" and root.attributes["safecode.judge_error"] == "judge_error"
    assert SECRET not in repr([dict(s.attributes) for s in exporter.get_finished_spans()])


def test_bad_input_and_cancellation_end_the_span_and_write_their_audit_line(tiny_vlm, test_image, exporter, tmp_path):
    engine = SafeCoDe(*tiny_vlm, judge="fixed:safe")
    engine.audit_log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError):
        engine.generate(_messages(test_image), max_new_tokens=2, temperature=-1.0, do_sample=True)
    stream = engine.stream(_messages(test_image), max_new_tokens=50)
    next(iter(stream))
    stream.close()
    engine.audit_log.close()
    roots = sorted((s for s in exporter.get_finished_spans() if s.name.startswith("chat ")), key=lambda s: s.start_time)
    assert roots[0].status.status_code.name == "ERROR"
    assert roots[0].attributes["error.type"] == "SafeCoDeInputError" and "safecode.verdict" not in roots[0].attributes
    assert roots[1].attributes["safecode.cancelled"] is True
    first, second = (json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines())
    assert (first["outcome"], first["error_type"], first["verdict"]) == ("failed", "SafeCoDeInputError", None)
    assert (second["outcome"], second["verdict"]) == ("cancelled", "safe")
    assert first["trace_id"] == format(roots[0].context.trace_id, "032x")


def test_the_engine_audit_switch_writes_text_only_when_opted_in(tiny_vlm, test_image, tmp_path):
    engine = SafeCoDe(*tiny_vlm, judge="fixed:unsafe")
    for name, content in (("plain.jsonl", False), ("content.jsonl", True)):
        engine.audit_log = AuditLog(tmp_path / name, content=content)
        result = engine.generate(_messages(test_image), max_new_tokens=3)
        engine.audit_log.close()
    plain = json.loads((tmp_path / "plain.jsonl").read_text())
    opted = json.loads((tmp_path / "content.jsonl").read_text())
    assert SECRET not in (tmp_path / "plain.jsonl").read_text() and "content" not in plain
    assert opted["content"] == [{"role": "user", "text": f"[image]\nWhat is {SECRET}?"}]
    assert plain["content_sha256"] == opted["content_sha256"]  # the same request, the same digest
    assert plain["trace_id"] is None  # not traced: no trace to name
    assert (plain["verdict"], plain["source"], plain["judge"]) == ("unsafe", "judge", "fixed:unsafe")
    assert plain["completion_tokens"] == result.usage.completion_tokens and plain["refused"] == result.refused


def test_with_tracing_off_a_request_records_nothing(tiny_vlm, test_image):
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    use_tracer_provider(provider)
    try:
        # the engine's whole cost when off: this returns None, and nothing else runs
        assert RequestRecord.start("m", _messages(test_image), {}, None, 5) is None
        SafeCoDe(*tiny_vlm, judge="fixed:safe").generate(_messages(test_image), max_new_tokens=3)
    finally:
        use_tracer_provider(None)
    assert spans.get_finished_spans() == ()


def test_without_opentelemetry_installed_the_engine_works(tiny_model_dir):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if the package were not installed
        from transformers import AutoModelForImageTextToText, AutoProcessor
        import safecode_guard
        from safecode_guard import SafeCoDe
        from safecode_guard.observability import tracing_available
        from safecode_guard.observability.records import RequestRecord
        assert not tracing_available()
        path = {str(tiny_model_dir("llava"))!r}
        engine = SafeCoDe(AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path), judge="fixed:safe")
        assert RequestRecord.start("m", [], {{}}, None, 5) is None
        print(engine.generate([{{"role": "user", "content": "hi"}}], max_new_tokens=3).finish_reason)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in ("stop", "length")


def test_a_request_asked_again_under_its_verdict_is_one_audit_line_with_the_judges_source(
    tiny_vlm, test_image, exporter, tmp_path
):
    # what ChatSafeCoDe does for an unsafe verdict on a JSON request: drop the unstarted stream,
    # then decode under the verdict already decided (the judge does not run twice)
    engine = SafeCoDe(*tiny_vlm, judge="fixed:unsafe")
    engine.audit_log = AuditLog(tmp_path / "audit.jsonl")
    first = engine.stream(_messages(test_image), max_new_tokens=3, start=False)
    first.close()
    engine.stream(_messages(test_image), max_new_tokens=3, verdict=first.verdict).consume()
    engine.audit_log.close()
    (line,) = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (line["verdict"], line["source"], line["outcome"]) == ("unsafe", "judge", "answered")
    superseded, answered = sorted((s for s in exporter.get_finished_spans() if s.name.startswith("chat ")),
                                  key=lambda s: s.start_time)
    assert superseded.attributes["safecode.superseded"] is True
    assert answered.attributes["safecode.source"] == "judge" and "safecode.superseded" not in answered.attributes
