"""OpenAI's conventions as the `openai` client meets them, ported from vLLM's own server tests.

vLLM's `tests/entrypoints/openai/test_chat.py`, `test_chat_error.py` and
`test_basic.py` check what any OpenAI-compatible server must do; the checks
that exercise standard OpenAI behaviour (status codes, error bodies, the
`model` name, media types, stream options, logprobs, `n`, response_format
text, accepted metadata fields, a failure while decoding: a 500 with OpenAI's
error body, or mid-stream an error event and `[DONE]`) are rewritten here against the app of
`safecode-guard serve` on a tiny model. vLLM-only extensions (custom roles,
`continuous_usage_stats`, prompt logprobs, guided decoding) stay out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from support.servers import ThreadServer

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

NAME, ALIAS = "tiny-vlm", "tiny-alias"
MESSAGES = [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "what is 1+1?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> Iterator[ThreadServer]:
    from safecode_guard.serving import ServerSettings, create_app

    settings = ServerSettings(
        model=str(tiny_model_dir("llava")), judge="fixed:safe", served_model_name=(NAME, ALIAS), max_new_tokens=6
    )
    with ThreadServer(create_app(settings)) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(**{"model": NAME, "messages": MESSAGES, "max_completion_tokens": 5, **kwargs})


# -- status codes and error bodies (vLLM test_chat.py / test_basic.py) ---------------------------


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"temperature": 5}, "temperature", "decimal_above_max_value"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "integer_below_min_value"),
    ({"seed": -(2**63) - 1}, "seed", "integer_below_min_value"),
    ({"seed": 2**63}, "seed", "integer_above_max_value"),
    ({"extra_body": {"best_of": 3}}, "best_of", "unknown_parameter"),
    ({"messages": []}, "messages", "empty_array"),
])
def test_a_bad_field_is_a_400_naming_it(client, kwargs, param, code):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, **kwargs)
    error = info.value.body
    assert info.value.status_code == 400
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), error


def test_stream_options_need_a_stream(client):
    for options in ({"include_usage": True}, {"include_usage": None}):
        with pytest.raises(openai.BadRequestError):
            create(client, stream=False, stream_options=options)


def test_stream_options_include_usage_adds_one_last_chunk(client):
    chunks = list(create(client, stream=True, stream_options={"include_usage": False}))
    assert all(c.usage is None for c in chunks)
    chunks = list(create(client, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert all(c.usage is None for c in body) and sum(c.choices[0].finish_reason is not None for c in body) == 1
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_streamed_text_equals_the_whole_answer(client):
    whole = create(client, temperature=0.0)
    pieces, finishes = [], []
    for chunk in create(client, temperature=0.0, stream=True):
        if chunk.choices[0].delta.role:
            assert chunk.choices[0].delta.role == "assistant"
        pieces.append(chunk.choices[0].delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert [f for f in finishes if f is not None] == [whole.choices[0].finish_reason]


def test_the_served_name_and_its_aliases_are_the_models(client, server):
    assert [m.id for m in client.models.list()] == [NAME, ALIAS]
    assert create(client).model == NAME
    assert create(client, model=ALIAS).model == NAME
    with pytest.raises(openai.NotFoundError) as info:
        create(client, model="gpt-4o")
    assert (info.value.body["code"], info.value.body["param"]) == ("model_not_found", "model")
    # leaving `model` out (vLLM accepts it) answers with the served model
    plain = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert plain.status_code == 200 and plain.json()["model"] == NAME


def test_a_body_that_is_not_json_is_a_415(client, server):
    with pytest.raises(openai.APIStatusError) as info:
        create(client, extra_headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert info.value.status_code == 415 and info.value.body["code"] == "unsupported_media_type"
    for content_type in ("text/plain", None):
        headers = {"Content-Type": content_type} if content_type else {}
        answer = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": []}', headers=headers)
        assert answer.status_code == 415, content_type
    ok = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_library_input_errors_read_like_openai_codes(client):
    with pytest.raises(openai.BadRequestError) as info:
        create(client, logit_bias={"999999999": 5})  # not a token id of this model
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["code"] == "invalid_value" and "safe_co_de" not in str(info.value.body)


# -- a failure while decoding (vLLM test_chat_error.py) -----------------------------------------


@pytest.fixture
def failing_steps(monkeypatch) -> None:
    """Every decode step after the first token fails (the first comes from the prefill)."""
    from safecode_guard.engine.adapters import Decoder

    def step(self: Any, rows: Any, tokens: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(Decoder, "step", step)


def test_a_decoding_failure_is_a_500_with_openais_error_body(client, failing_steps):
    with pytest.raises(openai.InternalServerError) as info:
        create(client)
    error = info.value.body
    assert info.value.status_code == 500
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "CUDA" not in error["message"]  # the details go to the log, not to the client


def test_a_decoding_failure_mid_stream_ends_with_an_error_event_and_done(server, failing_steps):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as answer:
        assert answer.status_code == 200  # the stream had begun: the failure comes as an event
        events = [line for line in answer.iter_lines() if line.startswith("data: ")]
    assert len(events) >= 2 and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert "error" not in bodies[0] and bodies[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [i for i, b in enumerate(bodies) if "error" in b] == [len(bodies) - 1]  # last, then only [DONE]
    assert bodies[-1]["error"]["type"] == "server_error" and "CUDA" not in bodies[-1]["error"]["message"]


def test_the_server_answers_again_after_a_decoding_failure(client, failing_steps, monkeypatch):
    with pytest.raises(openai.InternalServerError):
        create(client)
    monkeypatch.undo()
    assert create(client).choices[0].finish_reason in ("stop", "length")


# -- standard fields (vLLM test_chat.py; OpenAI's own defaults) ----------------------------------


def test_metadata_fields_are_accepted_and_ignored(client):
    plain = create(client, temperature=0)
    tagged = create(client, temperature=0, store=False, metadata={"app": "test"}, service_tier="auto", user="u-1",
                    response_format={"type": "text"}, logprobs=False,
                    extra_body={"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0})
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    assert tagged.choices[0].logprobs is None


def shared_prefills() -> int:
    """Answers so far that copied another answer's prefill instead of running their own (every model)."""
    from safecode_guard.engine.registry import schedulers

    return sum(s.stats["prefills_shared"] for s in schedulers())


def test_n_choices_share_one_verdict_and_sample_each_their_own(client):
    before = shared_prefills()
    answer = create(client, n=3, temperature=1.0, seed=5, max_completion_tokens=6)
    assert shared_prefills() - before == 2  # one prefill for the three choices
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.completion_tokens == sum(
        create(client, temperature=1.0, seed=5 + i, max_completion_tokens=6).usage.completion_tokens for i in range(3)
    )
    texts = [c.message.content for c in answer.choices]
    assert texts == [create(client, temperature=1.0, seed=5 + i, max_completion_tokens=6).choices[0].message.content
                     for i in range(3)]  # choice i is seeded with seed + i
    streamed: dict[int, str] = {}
    finishes: dict[int, int] = {}
    chunks = list(create(client, n=3, temperature=1.0, seed=5, max_completion_tokens=6, stream=True,
                         stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            finishes[choice.index] = finishes.get(choice.index, 0) + (choice.finish_reason is not None)
    assert [streamed[i] for i in range(3)] == texts and finishes == {0: 1, 1: 1, 2: 1}
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert sum("safety" in (c.model_extra or {}) for c in chunks) == 1  # the verdict once, on the first event
    greedy = create(client, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    with pytest.raises(openai.BadRequestError) as info:
        create(client, n=9)
    assert info.value.body["param"] == "n"


# -- logprobs (vLLM test_chat.py: no / zero / some / too many logprobs) --------------------------


def test_logprobs_none_zero_and_some(client):
    assert create(client, logprobs=False).choices[0].logprobs is None
    zero = create(client, logprobs=True, top_logprobs=0).choices[0]
    assert zero.logprobs.content and all(len(t.top_logprobs) == 0 for t in zero.logprobs.content)
    some = create(client, logprobs=True, top_logprobs=5)
    entries = some.choices[0].logprobs.content
    assert len(entries) == some.usage.completion_tokens and all(len(t.top_logprobs) == 5 for t in entries)
    for t in entries:  # greedy: the chosen token is the likeliest of its step
        assert t.logprob == t.top_logprobs[0].logprob and t.logprob <= 0 and t.bytes == list(t.token.encode())


def test_too_many_logprobs_are_refused_and_the_server_goes_on(client):
    for stream in (True, False):
        with pytest.raises(openai.BadRequestError) as info:
            create(client, logprobs=True, top_logprobs=21, stream=stream)
        assert info.value.body["param"] == "top_logprobs"
    assert create(client).choices[0].message.content is not None


def test_streamed_logprobs_add_up_to_the_whole_answers(client):
    whole = create(client, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed = [t for c in create(client, logprobs=True, top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole]


def test_vllm_extras_are_honoured_or_refused_by_name(client):
    plain = create(client, max_completion_tokens=4)
    same = create(client, max_completion_tokens=4, extra_body={"min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 2})
    assert same.choices[0].message.content == plain.choices[0].message.content
    for extra, field in (({"min_tokens": 9}, "min_tokens"), ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")):
        with pytest.raises(openai.BadRequestError) as info:
            create(client, max_completion_tokens=4, extra_body=extra)
        assert info.value.body["param"] == field
