"""Constrained decoding through the real engine on tiny random models (issue 20).

Random weights write garbage unconstrained; under a grammar every answer for a
finite schema parses and validates, every time. Families: Llava (Llama text
model, byte-level BPE, ChatML) and Qwen2.5-VL (Qwen template, M-RoPE rows);
tool calls in the Qwen/Hermes layout and in Llama 3.1's JSON layout.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from support.messages import user_turn

from safecode_guard import SafeCoDe, SafeCoDeConfig
from safecode_guard.constrained import (
    UnsupportedSchemaError,
    json_object_constraint,
    json_schema_constraint,
    tool_call_constraint,
)
from safecode_guard.testing import gradient_image, stripes_image

pytest.importorskip("llguidance")

FAMILIES = ("llava", "qwen2_5_vl")

FINITE = {
    "type": "object",
    "properties": {
        "safe": {"type": "boolean"},
        "color": {"enum": ["red", "dark green", "blue"]},
        "label": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        "box": {"type": "object", "properties": {"w": {"type": "integer", "maximum": 9}}, "required": ["w"]},
    },
    "required": ["safe", "color", "label", "count", "tags", "box"],
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}
IS_OPEN = {
    "type": "function",
    "function": {
        "name": "is_open",
        "description": "Whether a shop is open.",
        "parameters": {"type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"]},
    },
}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "is_open": IS_OPEN["function"]["parameters"]}

#: How each tool-capable tiny family writes a call (testing.call_text): the grammar's fixed parts.
LAYOUTS = {
    "qwen2_5_vl": dict(call_open='<tool_call>\n{"name": "', name_to_args='", "arguments": ', call_close="}\n</tool_call>"),
    "llava": dict(call_open='{"name": "', name_to_args='", "parameters": ', call_close="}"),
}


def engine(tool_models, family: str, judge: str = "fixed:safe", **config: Any) -> SafeCoDe:
    model, processor = tool_models[family]
    return SafeCoDe(model, processor, config=SafeCoDeConfig(**config), judge=judge)


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_output_from_a_random_model_validates_every_time(tool_models, family):
    eng = engine(tool_models, family)
    c = json_schema_constraint(FINITE)
    runs = [
        (user_turn("Describe the picture as JSON.", gradient_image()), {}),
        (user_turn("Describe the picture as JSON.", stripes_image()), {"do_sample": True, "temperature": 1.3, "seed": 1}),
        (user_turn("Answer in JSON."), {"do_sample": True, "seed": 2}),
        (user_turn("Answer in JSON."), {"do_sample": True, "temperature": 2.0, "top_p": 0.9, "seed": 3}),
        (user_turn("Answer in JSON.", gradient_image()), {"frequency_penalty": 2.0, "logit_bias": {"0": 100}}),
    ]
    for messages, kw in runs:
        result = eng.generate(messages, constraint=c, max_new_tokens=120, **kw)
        assert result.constrained and result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), FINITE)
    # unconstrained, the same random model does not write this schema's JSON (the grammar did the work)
    free = eng.generate(runs[0][0], max_new_tokens=40)
    assert not free.constrained and not free.text.startswith('{"safe": ')
    assert eng.grammars.stats["misses"] == 1 and eng.grammars.stats["hits"] == len(runs) - 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", ["get_weather", "required"])
def test_forced_tool_call_arguments_validate_against_the_tool_schema(tool_models, family, choice):
    from safecode_guard.tools import parse_answer

    eng = engine(tool_models, family)
    layout = LAYOUTS[family]
    named = choice if choice in SCHEMAS else None
    prefix = layout["call_open"] + (named + layout["name_to_args"] if named else "")
    c = tool_call_constraint(SCHEMAS, name_to_args=layout["name_to_args"], call_close=layout["call_close"], named=named)
    for seed in range(4):
        result = eng.generate(
            user_turn("What is the weather in Rome?", gradient_image()), tools=[WEATHER, IS_OPEN], answer_prefix=prefix,
            constraint=c, max_new_tokens=60, do_sample=seed > 0, seed=seed,
        )
        parsed = parse_answer(prefix + result.text, list(SCHEMAS))
        assert not parsed.invalid_tool_calls and len(parsed.tool_calls) == 1, prefix + result.text
        call = parsed.tool_calls[0]
        assert call["name"] == named or named is None
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


def test_constrained_and_free_requests_in_one_batch_get_the_tokens_they_get_alone(tool_models):
    eng = engine(tool_models, "qwen2_5_vl", lambda_boost=3.0, lambda_supp=3.0)
    unsafe = engine(tool_models, "qwen2_5_vl", judge="fixed:unsafe")
    other_schema = {"type": "object", "properties": {"yes": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}, "required": ["yes", "n"]}
    requests = [
        (eng, user_turn("JSON please.", gradient_image()), {"constraint": json_schema_constraint(FINITE), "max_new_tokens": 80}),
        (eng, user_turn("Describe the image.", stripes_image()), {"max_new_tokens": 12}),
        (eng, user_turn("Another JSON."), {"constraint": json_schema_constraint(other_schema), "max_new_tokens": 30, "do_sample": True, "seed": 4}),
        (unsafe, user_turn("JSON please.", gradient_image()), {"constraint": json_schema_constraint(FINITE), "max_new_tokens": 10}),
        (eng, user_turn("Say something.", gradient_image()), {"max_new_tokens": 9, "do_sample": True, "seed": 5}),
    ]
    alone = [e.generate(m, **kw) for e, m, kw in requests]
    assert [r.constrained for r in alone] == [True, False, True, False, False]
    scheduler = eng.scheduler
    before = scheduler.stats["shared_prefills"]
    streams = [e.stream(m, start=False, **kw) for e, m, kw in requests]
    with scheduler._cond:  # the worker admits them in one round: one prefill, shared steps
        for stream in streams:
            stream.start()
    together = [s.consume() for s in streams]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert scheduler.stats["shared_prefills"] == before + 1


def test_an_unsafe_verdict_drops_the_constraint_for_a_free_text_refusal(tool_models):
    eng = engine(tool_models, "llava", judge="fixed:unsafe")
    result = eng.generate(user_turn("JSON please.", gradient_image()), constraint=json_schema_constraint(FINITE), max_new_tokens=12)
    assert not result.constrained and result.refused
    assert result.verdict is not None and result.verdict.label == "unsafe"
    assert not result.text.startswith("{")


def test_an_uncompilable_schema_fails_before_the_judge_and_the_model_stays_usable(tool_models):
    calls = []

    def judge(request: Any) -> str:
        calls.append(request)
        return "safe"

    model, processor = tool_models["llava"]
    eng = SafeCoDe(model, processor, judge=judge)
    bad = {"type": "object", "properties": {"when": {"type": "string"}}, "dependentSchemas": {"when": {}}}
    with pytest.raises(UnsupportedSchemaError, match="`dependentSchemas`") as info:
        eng.generate(user_turn("JSON please."), constraint=json_schema_constraint(bad))
    assert info.value.keywords == ("dependentSchemas",) and calls == []
    with pytest.raises(ValueError, match="Constraint"):
        eng.generate(user_turn("JSON please."), constraint={"type": "object"})  # type: ignore[arg-type]
    ok = eng.generate(user_turn("JSON please."), constraint=json_schema_constraint({"enum": ["yes", "no"]}), max_new_tokens=5)
    assert json.loads(ok.text) in ("yes", "no") and len(calls) == 1


def test_max_new_tokens_cuts_a_constrained_answer_with_finish_reason_length(tool_models):
    eng = engine(tool_models, "qwen2_5_vl")
    result = eng.generate(user_turn("JSON please."), constraint=json_schema_constraint(FINITE), max_new_tokens=4)
    assert result.constrained and result.finish_reason == "length" and len(result.token_ids) == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)
    # JSON mode: any object; a random model fills it with keys, so only the opening is certain
    mode = eng.generate(user_turn("JSON please."), constraint=json_object_constraint(), max_new_tokens=6)
    assert mode.constrained and mode.text.startswith("{")
