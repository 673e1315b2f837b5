"""Constrained answers over HTTP with the official `openai` client (issue 20, items 3 and 4).

A tool-capable tiny random Qwen2.5-VL serves in this process (uvicorn on
127.0.0.1): `response_format` JSON that validates every time, forced tool calls
in `message.tool_calls` with `finish_reason: "tool_calls"`, a 400 naming an
unsupported schema keyword, and under an unsafe verdict OpenAI's refusal shape
(`message.refusal` set, `message.content` null).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from support.servers import ThreadServer

pytest.importorskip("llguidance")
pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

SCHEMA = {
    "type": "object",
    "properties": {
        "safe": {"type": "boolean"},
        "color": {"enum": ["red", "dark green", "blue"]},
        "label": {"type": "string", "maxLength": 8},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
    },
    "required": ["safe", "color", "label", "count"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA, "strict": True}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
        },
    },
}
IS_OPEN = {
    "type": "function",
    "function": {"name": "is_open", "description": "Is it open?", "parameters": {"type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"]}},
}
ARGS = {"get_weather": WEATHER["function"]["parameters"], "is_open": IS_OPEN["function"]["parameters"]}
ASK = [{"role": "user", "content": "Describe the scene as JSON."}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> str:
    from safecode_guard.testing import build_tool_vlm

    return str(build_tool_vlm("qwen2_5_vl", tmp_path_factory.mktemp("constrained_server") / "qwen"))


def serve(model: str, judge: str) -> ThreadServer:
    from safecode_guard.serving import ServerSettings, create_app

    # "x": the `model` these tests send, served as an alias
    settings = ServerSettings(model=model, judge=judge, max_new_tokens=96, served_model_name=("qwen", "x"))
    return ThreadServer(create_app(settings))


@pytest.fixture(scope="module")
def safe_client(tool_model):
    from support.servers import allow_loopback

    allow_loopback()  # module-scoped: the per-test marker does not cover it
    with serve(tool_model, "fixed:safe") as srv:
        yield openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_validates_every_time(safe_client):
    for seed in range(4):
        done = safe_client.chat.completions.create(
            model="x", messages=ASK, response_format=RESPONSE_FORMAT, seed=seed, temperature=1.2 if seed else 0,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "stop" and choice.message.refusal is None
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_streamed_json_schema_answer_validates(safe_client):
    stream = safe_client.chat.completions.create(model="x", messages=ASK, response_format=RESPONSE_FORMAT, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_mode_answers_an_object_and_a_cut_answer_says_length(safe_client):
    done = safe_client.chat.completions.create(
        model="x", messages=ASK, response_format={"type": "json_object"}, max_tokens=48,
    )
    content, finish = done.choices[0].message.content, done.choices[0].finish_reason
    assert content.startswith("{")
    if finish == "stop":  # the grammar completed: one JSON object, nothing after it
        assert isinstance(json.loads(content), dict)
    cut = safe_client.chat.completions.create(model="x", messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=4)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_calls_come_back_as_tool_calls_with_valid_arguments(safe_client, tool_choice: Any):
    for seed in range(3):
        done = safe_client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER, IS_OPEN],
            tool_choice=tool_choice, seed=seed, temperature=1.0 if seed else 0,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        (call,) = choice.message.tool_calls
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])


def test_an_unsupported_schema_keyword_is_a_400_naming_it(safe_client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}
    with pytest.raises(openai.BadRequestError) as info:
        safe_client.chat.completions.create(model="x", messages=ASK, response_format=bad)
    assert "`not`" in info.value.message
    assert info.value.body["code"] == "unsupported_schema"
    # the model is still usable
    ok = safe_client.chat.completions.create(model="x", messages=ASK, response_format=RESPONSE_FORMAT)
    jsonschema.validate(json.loads(ok.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("extra", [
    {"response_format": RESPONSE_FORMAT},
    {"response_format": {"type": "json_object"}},
    {"tools": [WEATHER], "tool_choice": "required"},
])
def test_min_tokens_on_an_answer_that_ends_with_its_json_is_a_400_naming_it(safe_client, extra: dict):
    """A JSON answer ends when its JSON is complete: `min_tokens` could only be dropped silently."""
    with pytest.raises(openai.BadRequestError) as info:
        safe_client.chat.completions.create(model="x", messages=ASK, extra_body={"min_tokens": 5}, **extra)
    assert info.value.body["param"] == "min_tokens" and "JSON" in info.value.message
    # free text under tool_choice="auto" still takes it
    done = safe_client.chat.completions.create(
        model="x", messages=ASK, tools=[WEATHER], max_tokens=8, extra_body={"min_tokens": 8}
    )
    assert done.usage.completion_tokens == 8 or done.choices[0].finish_reason == "tool_calls"


def test_an_unsafe_verdict_comes_back_as_a_refusal_with_null_content(tool_model):
    with serve(tool_model, "fixed:unsafe") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        done = client.chat.completions.create(model="x", messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=12)
        message = done.choices[0].message
        assert message.content is None and message.refusal
        assert message.refusal.startswith(("I", "Sorry", "As an AI"))
        assert done.model_extra["safety"]["verdict"] == "unsafe"
        forced = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], tool_choice="required", max_tokens=12,
        )
        assert forced.choices[0].message.tool_calls is None and forced.choices[0].message.refusal
        assert forced.choices[0].message.content is None
        stream = list(client.chat.completions.create(
            model="x", messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=12, stream=True,
        ))
        deltas = [c.choices[0].delta for c in stream if c.choices]
        assert "".join(d.refusal or "" for d in deltas) == message.refusal
        assert not any(d.content for d in deltas)
        # a free request on the same server keeps its text in `content`
        free = client.chat.completions.create(model="x", messages=ASK, max_tokens=12)
        assert free.choices[0].message.content and free.choices[0].message.refusal is None


@pytest.mark.parametrize(
    ("extra", "constrained"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, True),
        ({"response_format": {"type": "json_object"}}, True),
        ({"response_format": {"type": "text"}}, False),
        ({"tools": [WEATHER], "tool_choice": "required"}, True),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True),
        ({"tools": [WEATHER], "tool_choice": "auto"}, False),
        ({"tools": [WEATHER]}, False),
        ({}, False),
    ],
)
def test_which_requests_answer_with_message_refusal_when_unsafe(extra: dict, constrained: bool):
    from safecode_guard.serving.protocol import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": "x", "messages": ASK, **extra})
    assert req.constrained is constrained


JOKE = {
    "type": "object",
    "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
    "required": ["setup", "punchline"],
}


def test_an_unbounded_schema_closes_within_max_tokens_and_says_so(safe_client):
    """A random model loops inside the first string; the answer still ends valid within max_tokens
    (`SafeCoDeConfig.close_constrained`), flagged `closed_early` on the choice (an extension field)."""
    joke = {"type": "json_schema", "json_schema": {"name": "joke", "schema": JOKE}}
    done = safe_client.chat.completions.create(model="x", messages=ASK, response_format=joke, max_tokens=40)
    choice = done.choices[0]
    jsonschema.validate(json.loads(choice.message.content), JOKE)
    assert choice.finish_reason == "stop" and done.usage.completion_tokens <= 40
    assert choice.model_extra == {"closed_early": True}
    stream = safe_client.chat.completions.create(model="x", messages=ASK, response_format=joke, max_tokens=40, stream=True)
    chunks = [c for c in stream if c.choices]
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), JOKE)
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].model_extra == {"closed_early": True}
    plain = safe_client.chat.completions.create(model="x", messages=ASK, max_tokens=5)
    assert "closed_early" not in (plain.choices[0].model_extra or {})  # only where it happened
    # n choices share one prefill; each closes in its own budget
    several = safe_client.chat.completions.create(
        model="x", messages=ASK, response_format=joke, max_tokens=40, n=3, temperature=1.0, seed=5
    )
    for choice in several.choices:
        jsonschema.validate(json.loads(choice.message.content), JOKE)
        assert choice.finish_reason == "stop" and choice.model_extra == {"closed_early": True}


def test_an_auto_call_the_model_opens_comes_back_valid(safe_client, tool_model, monkeypatch):
    """`tool_choice` "auto" (the default with `tools`): free text until the model opens a call, then
    the call's JSON under the tools' grammar. `nudge_to_call` stands in for a trained model's
    decision to call (the opening only); the name and arguments are the random model's."""
    from support.tools import nudge_to_call
    from transformers import AutoProcessor

    nudge_to_call(monkeypatch, AutoProcessor.from_pretrained(tool_model).tokenizer, '<tool_call>\n{"name": "', at=2)
    for seed in range(3):
        done = safe_client.chat.completions.create(
            model="x", messages=ASK, tools=[WEATHER, IS_OPEN], temperature=1.0, seed=seed, max_tokens=96,
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, (choice, done.usage)
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])
    stream = safe_client.chat.completions.create(model="x", messages=ASK, tools=[WEATHER, IS_OPEN], max_tokens=96, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert calls and chunks[-1].choices[0].finish_reason == "tool_calls"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), ARGS[call.function.name])
