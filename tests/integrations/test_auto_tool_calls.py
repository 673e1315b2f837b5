"""`tool_choice="auto"` through `ChatSafeCoDe` on tiny random models (issue 20, item 2).

The answer is free text until the model opens a call; from there the call's
JSON is constrained to the bound tools (a bound tool's name, arguments valid
for its schema), then free again. Random weights never decide to call, so
`support.tools.nudge_to_call` stands in for that decision: it biases the
logits toward the template's call opening only; the tool's name and the
arguments are the random model's own choices under the grammar.
"""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field
from support.tools import nudge_to_call

from safecode_guard import ChatSafeCoDe
from safecode_guard.testing import build_tool_vlm, gradient_image

pytest.importorskip("llguidance")


class GetWeather(BaseModel):
    """Weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


class Search(BaseModel):
    """Search the web."""

    query: str


SCHEMAS = {"GetWeather": GetWeather.model_json_schema(), "Search": Search.model_json_schema()}
#: family -> (the template's call opening, the answer token where the nudged call starts)
OPENERS = {"qwen2_5_vl": ('<tool_call>\n{"name": "', 3), "llava": ('{"name": "', 0)}


def photo(text: str = "What is the weather?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": gradient_image()}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("auto_calls")
    return {family: str(build_tool_vlm(family, root / family)) for family in OPENERS}


def check_calls(message) -> None:
    assert message.tool_calls and not message.invalid_tool_calls, message
    for call in message.tool_calls:
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


@pytest.mark.parametrize("family", list(OPENERS))
def test_a_call_the_model_opens_under_auto_is_a_valid_call_of_a_bound_tool(models, family, monkeypatch):
    chat = ChatSafeCoDe(model=models[family], judge="fixed:safe", max_tokens=96)
    opener, at = OPENERS[family]
    nudge_to_call(monkeypatch, chat.engine.tokenizer, opener, at=at)
    llm = chat.bind_tools([GetWeather, Search])  # tool_choice: "auto", LangChain's default
    for kwargs in ({}, {"temperature": 1.3, "seed": 1}, {"temperature": 0.8, "top_p": 0.9, "seed": 2}):
        check_calls(llm.invoke(photo(), **kwargs))
    chunks = list(llm.stream(photo("Stream it.")))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    check_calls(merged)


def test_without_a_call_the_auto_answer_stays_free_text(models):
    llm = ChatSafeCoDe(model=models["qwen2_5_vl"], judge="fixed:safe", max_tokens=24).bind_tools([GetWeather, Search])
    message = llm.invoke(photo())
    assert message.tool_calls == [] and message.invalid_tool_calls == [] and message.text
    # a free answer the budget cuts is cut, not closed: closing is for calls and JSON
    assert message.response_metadata["finish_reason"] == "length"
    assert "closed_early" not in message.response_metadata
