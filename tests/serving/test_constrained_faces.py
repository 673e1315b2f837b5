"""Constrained decoding has one path for every face: `ChatSafeCoDe` and the server plan a JSON answer
in `safecode_guard.calls`, so the same weights give the same schema-valid answer greedily, and under an
unsafe verdict the same free-text refusal (the server's `message.refusal`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from support.servers import ThreadServer

from safecode_guard import ChatSafeCoDe

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

SCHEMA = {
    "type": "object",
    "properties": {"hazard": {"type": "boolean"}, "kind": {"enum": ["cliff", "water", "none"]}},
    "required": ["hazard", "kind"],
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "scene", "schema": SCHEMA}}
ASK = "Describe the scene as JSON."


@pytest.fixture(scope="module", params=["fixed:safe", "fixed:unsafe"])
def faces(request, tiny_model_dir) -> Iterator[tuple[ChatSafeCoDe, openai.OpenAI, str]]:
    from safecode_guard.serving import ServerSettings, create_app

    model = str(tiny_model_dir("llava"))
    chat = ChatSafeCoDe(model=model, judge=request.param)
    settings = ServerSettings(model=model, judge=request.param, served_model_name="tiny")
    with ThreadServer(create_app(settings)) as srv:
        yield chat, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0), request.param


def test_a_json_schema_answer_is_the_same_from_chat_safecode_and_the_server(faces):
    chat, client, judge = faces
    by_chat = chat.invoke(ASK, max_tokens=96, response_format=FORMAT)
    by_server = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": ASK}], max_tokens=96, response_format=FORMAT
    ).choices[0]
    if judge == "fixed:safe":
        assert by_server.message.refusal is None
        assert by_server.message.content == by_chat.text
        assert by_server.finish_reason == "stop"  # a finite schema completes: the grammar ends the answer
        jsonschema.validate(json.loads(by_server.message.content), SCHEMA)
    else:
        # the grammar is dropped: a free-text refusal, the same words on both faces
        assert by_server.message.content is None
        assert by_server.message.refusal == by_chat.text
        assert by_chat.response_metadata["safety"]["verdict"] == "unsafe"
