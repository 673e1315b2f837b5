"""Structured output and forced tool calls through `ChatSafeCoDe` on tiny random models (issue 20, item 2).

Random weights, finite schemas: `with_structured_output` (json_schema by
default, function_calling, json_mode) returns a valid instance every time,
forced tool calls carry valid arguments, an unsafe verdict still raises
`ModelRefusalError`, and a token limit that cuts the answer raises the typed
`StructuredOutputTruncatedError`.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from langchain_core.exceptions import ModelRefusalError, OutputParserException
from pydantic import BaseModel, Field

from safecode_guard import ChatSafeCoDe
from safecode_guard.testing import build_tool_vlm, gradient_image

pytest.importorskip("llguidance")


class Scene(BaseModel):
    """What the picture shows."""

    hazard: bool
    kind: Literal["cliff", "traffic", "water", "none"]
    people: int = Field(ge=0, le=9)
    note: str = Field(max_length=6)


class GetWeather(BaseModel):
    """Weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


def get_weather(city: Literal["Paris", "Rome"], days: int) -> str:
    """Weather in a city for some days."""
    return f"{city}: sunny for {days} days"


def photo(text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": gradient_image()}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("constrained_lc")
    return {family: str(build_tool_vlm(family, root / family)) for family in ("qwen2_5_vl", "llava")}


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_gives_a_valid_instance_every_time(models, family, method):
    llm = ChatSafeCoDe(model=models[family], judge="fixed:safe", max_tokens=80)
    assert llm.profile["structured_output"] is True
    structured = llm.with_structured_output(Scene, method=method)
    for i, kwargs in enumerate([{}, {"temperature": 1.3, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2}]):
        scene = structured.invoke(photo(f"Describe the scene{'!' * i}"), **kwargs)
        assert isinstance(scene, Scene)
    as_dict = llm.with_structured_output(Scene.model_json_schema(), method=method).invoke(photo())
    jsonschema.validate(as_dict, Scene.model_json_schema())
    streamed = list(structured.stream(photo("Stream it.")))
    assert streamed and isinstance(streamed[-1], Scene)


def test_json_schema_is_the_default_method(models):
    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=80)
    raw = llm.with_structured_output(Scene, include_raw=True).invoke(photo())
    assert isinstance(raw["parsed"], Scene) and raw["parsing_error"] is None
    assert raw["raw"].tool_calls == [] and raw["raw"].text.startswith("{")  # an answer, not a tool call


def test_json_mode_gives_a_json_object(models):
    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=60)
    raw = llm.with_structured_output(Scene, method="json_mode", include_raw=True).invoke(photo())
    text = raw["raw"].text
    assert text.startswith("{")
    if raw["raw"].response_metadata["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)  # any keys: JSON mode does not follow the schema


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("tool_choice", ["GetWeather", "any", "required"])
def test_forced_tool_calls_have_valid_arguments(models, family, tool_choice):
    llm = ChatSafeCoDe(model=models[family], judge="fixed:safe", max_tokens=60)
    bound = llm.bind_tools([GetWeather, get_weather], tool_choice=tool_choice, strict=True)
    schemas = {"GetWeather": GetWeather.model_json_schema()}
    for seed in range(3):
        message = bound.invoke(photo("Weather in Rome?"), temperature=1.0 if seed else 0, seed=seed)
        assert message.invalid_tool_calls == [] and len(message.tool_calls) == 1, message
        call = message.tool_calls[0]
        if tool_choice == "GetWeather":
            assert call["name"] == "GetWeather"
        if call["name"] == "GetWeather":
            GetWeather(**call["args"])
        else:
            assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
            assert isinstance(call["args"]["days"], int)
    assert schemas  # the pydantic schema is what the grammar followed


def test_an_unsafe_verdict_still_raises_model_refusal_error(models):
    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:unsafe", max_tokens=16)
    for method in ("json_schema", "function_calling", "json_mode"):
        with pytest.raises(ModelRefusalError):
            llm.with_structured_output(Scene, method=method).invoke(photo())
    message = llm.bind_tools([GetWeather], tool_choice="required").invoke(photo())
    assert message.tool_calls == [] and not message.text.startswith("{")


def test_a_token_limit_that_cuts_the_answer_is_a_typed_error(models):
    from safecode_guard.langchain.tools import StructuredOutputTruncatedError

    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=4)
    with pytest.raises(StructuredOutputTruncatedError, match="max_tokens") as info:
        llm.with_structured_output(Scene).invoke(photo())
    assert isinstance(info.value, OutputParserException)
    raw = llm.with_structured_output(Scene, include_raw=True).invoke(photo())
    assert raw["raw"].response_metadata["finish_reason"] == "length"
    assert isinstance(raw["parsing_error"], StructuredOutputTruncatedError)


class Joke(BaseModel):
    """LangChain's standard-suite Joke: unbounded strings."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


@pytest.mark.parametrize("method", ["json_schema", "json_mode", "function_calling"])
def test_unbounded_strings_close_within_max_tokens(models, method):
    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=48)
    raw = llm.with_structured_output(Joke, method=method, include_raw=True).invoke(photo("A joke about cats."))
    assert isinstance(raw["parsed"], Joke) and raw["parsing_error"] is None
    assert raw["raw"].response_metadata["closed_early"] is True  # said honestly: the budget ended it
    assert raw["raw"].usage_metadata["output_tokens"] <= 48
    streamed = list(llm.with_structured_output(Joke, method=method).stream(photo("Stream it.")))
    assert streamed and isinstance(streamed[-1], Joke)


def test_with_closing_off_the_same_answer_is_a_typed_truncation_error(models):
    from safecode_guard import SafeCoDeConfig
    from safecode_guard.langchain.tools import StructuredOutputTruncatedError

    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=48,
                       safecode=SafeCoDeConfig(close_constrained=False))
    with pytest.raises(StructuredOutputTruncatedError):
        llm.with_structured_output(Joke).invoke(photo("A joke about cats."))


def test_json_mode_with_a_schema_is_valid_for_it_and_without_one_any_object(models):
    llm = ChatSafeCoDe(model=models["llava"], judge="fixed:safe", max_tokens=60)
    for _ in range(2):
        as_dict = llm.with_structured_output(Scene.model_json_schema(), method="json_mode").invoke(photo())
        jsonschema.validate(as_dict, Scene.model_json_schema())
        assert isinstance(llm.with_structured_output(Scene, method="json_mode").invoke(photo()), Scene)
    anything = llm.with_structured_output(None, method="json_mode").invoke(photo())
    assert isinstance(anything, dict)
    from safecode_guard import SafeCoDeInputError

    with pytest.raises(SafeCoDeInputError, match="needs a schema"):
        llm.with_structured_output(None)
