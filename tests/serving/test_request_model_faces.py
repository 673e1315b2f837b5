"""One request model on every face: the same bad decoding value is refused the same way by
`SafeCoDe.generate`, `ChatSafeCoDe.invoke` and the server (through the `openai` client), naming
the same field with the same message; and the server's module loads no LangChain."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from support.servers import ThreadServer

from safecode_guard import ChatSafeCoDe, SafeCoDe, SafeCoDeInputError
from safecode_guard.sampling import MAX_STOP_STRINGS

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

# (engine / ChatSafeCoDe keyword, value, the OpenAI request's field) -> refused by all three alike
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("temperature", 3.0, "temperature"),
    ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", -3.0, "frequency_penalty"),
    ("seed", -1, "seed"),
    ("max_tokens", 0, "max_tokens"),
    ("stop", [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)], "stop"),
    ("logit_bias", {"5": 101}, "logit_bias"),
    ("min_p", 2.0, "min_p"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
]


@pytest.fixture(scope="module")
def faces(tiny_vlm, tiny_model_dir) -> Iterator[tuple[SafeCoDe, ChatSafeCoDe, openai.OpenAI]]:
    from safecode_guard.serving import ServerSettings, create_app

    engine = SafeCoDe(*tiny_vlm, judge="fixed:safe")
    chat = ChatSafeCoDe.from_model(*tiny_vlm, judge="fixed:safe")
    settings = ServerSettings(model=str(tiny_model_dir("llava")), judge="fixed:safe", served_model_name="tiny")
    with ThreadServer(create_app(settings)) as srv:
        yield engine, chat, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(("name", "value", "field"), BAD_VALUES, ids=[f"{n}={v!r:.20}" for n, v, _ in BAD_VALUES])
def test_a_bad_value_is_refused_alike_on_every_face(faces, name, value, field):
    engine, chat, client = faces
    messages = [{"role": "user", "content": "hi"}]
    engine_name = "max_new_tokens" if name == "max_tokens" else name
    with pytest.raises(SafeCoDeInputError) as by_engine:
        engine.generate(messages, **{engine_name: value, **({"do_sample": True} if name == "temperature" else {})})
    with pytest.raises(SafeCoDeInputError) as by_chat:
        chat.invoke("hi", **{name: value})
    extra = {"temperature": 1.0} if name == "seed" else {}
    with pytest.raises(openai.BadRequestError) as by_server:
        wire = {field: value} if field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed",
                                           "max_tokens", "stop", "logit_bias") else {"extra_body": {field: value}}
        client.chat.completions.create(model="tiny", messages=messages, **wire, **extra)
    message = str(by_engine.value)
    assert message.startswith(f"`{engine_name}` (=")
    assert str(by_chat.value) == message
    assert by_server.value.body["message"] == message
    assert by_server.value.body["param"] == field
    assert by_engine.value.param == by_chat.value.param == engine_name


def test_a_good_value_is_accepted_alike_on_every_face(faces):
    engine, chat, client = faces
    kwargs = {"temperature": 2.0, "top_p": 0.5, "seed": 1, "presence_penalty": -2.0}
    messages = [{"role": "user", "content": "hi"}]
    assert engine.generate(messages, do_sample=True, max_new_tokens=2, **kwargs).usage.completion_tokens >= 1
    assert chat.invoke("hi", max_tokens=2, **kwargs).usage_metadata["output_tokens"] >= 1
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, **kwargs).usage.completion_tokens >= 1



def test_importing_the_server_loads_no_langchain():
    code = "import sys, safecode_guard.serving.app; print('langchain_core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
