"""`safecode-guard serve`: the real server on 127.0.0.1, driven by real clients.

A subprocess server (`safecode-guard serve`, or the same app with a keyword
judge for load tests) answers the official `openai` client (sync, async,
streaming), LangChain's `ChatOpenAI` and raw HTTP. Servers in a thread of the
test process cover what needs scripted tokens (tool calls), the moment before
the model is ready, a full queue and a client walking away mid-stream.
Every server is stopped by its own handle; the subprocess by its PID, with
SIGTERM, and must exit 0.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from support.image_bytes import data_url
from support.servers import UNSAFE_WORD, ServerProcess, ThreadServer, keyword_judge

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

KEY = "test-key-123"


def image_message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url()}}]}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    proc = ServerProcess.start(
        ["--model", str(tiny_model_dir("llava")), "--api-key", KEY, "--max-new-tokens", "12", "--max-body-mb", "2",
         "--header-timeout", "2", "--decode-budget-mb", "256"],
        keyword=True,
    )
    yield proc
    assert proc.stop() == 0  # SIGTERM: graceful, exit code 0


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


# -- the verdict on the wire ------------------------------------------------------------------


def test_openai_client_gets_the_answer_and_the_verdict(client):
    safe = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[image_message("Describe the image.")], max_tokens=8
    )
    completion = safe.parse()
    assert safe.headers["x-safecode-verdict"] == "safe"
    assert completion.model == "llava"  # the served model answers, whatever the client named
    assert completion.choices[0].message.content and completion.usage.completion_tokens == 8
    safety = completion.model_extra["safety"]
    assert safety["verdict"] == "safe" and safety["source"] == "judge" and safety["refused"] is False
    assert set(safety) >= {"verdict", "unsafe_score", "threshold", "judge", "source", "caption", "error",
                           "steered_steps", "unsafe_mode", "refused"}

    unsafe = client.chat.completions.create(
        model="anything", messages=[image_message(f"How do I wire the {UNSAFE_WORD}?")], max_completion_tokens=8
    )
    assert unsafe.model_dump()["safety"]["verdict"] == "unsafe"
    assert unsafe.model_extra["safety"]["refused"] is True  # SafeCoDe opened the answer with a refusal


async def test_async_streaming_carries_the_verdict_first_and_matches_the_answer(server, client):
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "system", "content": "Be brief."}, image_message("What is here?")]
    whole = client.chat.completions.create(model="x", messages=messages, max_tokens=10, seed=1)
    stream = await aclient.chat.completions.create(
        model="x", messages=messages, max_tokens=10, seed=1, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].model_extra["safety"]["verdict"] == "safe"
    assert all("safety" not in c.model_extra for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    await aclient.close()


def test_langchain_chat_openai_reads_the_verdict_header(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="served", max_tokens=6, include_response_headers=True)
    answer = llm.invoke([{"role": "user", "content": f"Tell me about the {UNSAFE_WORD}."}])
    assert answer.response_metadata["headers"]["x-safecode-verdict"] == "unsafe"
    chunks = list(llm.stream("Say hello."))
    assert "".join(c.text for c in chunks) and chunks[0].response_metadata["headers"]["x-safecode-verdict"] == "safe"


def test_generation_settings_are_applied(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    plain = client.chat.completions.create(model="x", messages=messages, max_tokens=12)
    first = plain.choices[0].message.content
    tok = _tokenizer()
    # the answer's first token, with or without the leading space answers never show
    first_ids = {tok.encode(text, add_special_tokens=False)[0] for text in (first, " " + first)}
    bias = {str(i): -100 for i in first_ids}
    biased = client.chat.completions.create(model="x", messages=messages, max_tokens=12, logit_bias=bias)
    assert biased.choices[0].message.content != first
    cut = client.chat.completions.create(model="x", messages=messages, max_tokens=12, stop=[first[3:6]])
    assert cut.choices[0].finish_reason == "stop" and first[3:6] not in cut.choices[0].message.content
    sampled = {client.chat.completions.create(model="x", messages=messages, max_tokens=12, temperature=1.5, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert len(sampled) > 1
    penalised = client.chat.completions.create(model="x", messages=messages, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.choices[0].message.content


_TOK: list[Any] = []


def _tokenizer() -> Any:
    return _TOK[0]


@pytest.fixture(autouse=True, scope="module")
def _load_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    _TOK[:] = [AutoTokenizer.from_pretrained(tiny_model_dir("llava"))]


def test_models_health_ready_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["llava"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401  # metrics follow the key unless --public-metrics
    client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"{UNSAFE_WORD}!"}], max_tokens=3)
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for needle in (
        'safecode_requests_total{status="200"}', 'safecode_verdicts_total{label="unsafe",source="judge"}',
        "safecode_prompt_tokens_total", "safecode_completion_tokens_total", "safecode_request_latency_seconds_bucket",
        "safecode_time_to_first_token_seconds_count", "safecode_queue_depth", "safecode_active_rows", "safecode_judge_errors_total",
    ):
        assert needle in text, needle


# -- errors: OpenAI's body, the right status, nothing leaked ----------------------------------


def _post(server, body: Any, *, key: str | None = KEY, raw: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers={"Content-Type": "application/json", **h}, timeout=60)


ERROR_CASES = {
    "no key": ({"messages": [{"role": "user", "content": "hi"}]}, {"key": None}, 401, "invalid_api_key"),
    "wrong key": ({"messages": [{"role": "user", "content": "hi"}]}, {"key": "nope"}, 401, "invalid_api_key"),
    "not json": (None, {"raw": b"{nope"}, 400, "invalid_json"),
    "unknown field": ({"messages": [{"role": "user", "content": "hi"}], "best_of": 3}, {}, 422, "invalid_schema"),
    "no messages": ({"messages": []}, {}, 422, "invalid_schema"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, {}, 422, "invalid_schema"),
    "n=2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, {}, 400, None),
    "client settings": ({"messages": [{"role": "user", "content": "hi"}], "safecode": {"verdict": "safe"}}, {}, 400, "request_settings_disabled"),
    "corrupt image": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAAA"}}]}]}, {}, 400, "image_input"),
    "local file": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, {}, 400, "image_input"),
    "image url (off)": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, {}, 400, "image_input"),
    "audio part": ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, {}, 400, "unsupported_content"),
    "bad tool args": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{bad"}}]}, {"role": "tool", "tool_call_id": "1", "content": "x"}]}, {}, 400, "unsupported_content"),
    "too many tokens": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, {}, 400, "input_limit"),
    "too big": (None, {"raw": b'{"messages": [' + b" " * (3 * 2**20) + b"]}"}, 413, "request_too_large"),
    "tool_choice without tools": ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, {}, 400, None),
    # nesting that makes Python's JSON parser recurse: typed 400s, never a RecursionError's 500
    "deep body": (None, {"raw": b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"}, 400, "nesting_too_deep"),
    "deep tool args": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a":' * 2000 + "1" + "}" * 2000}}]}, {"role": "tool", "tool_call_id": "1", "content": "x"}]}, {}, 400, "input_limit"),
    "deep tool schema": ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": json.loads('{"a":' * 500 + "1" + "}" * 500)}}]}, {}, 400, None),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_use_openai_bodies_and_statuses(server, case):
    body, kwargs, status, code = ERROR_CASES[case]
    response = _post(server, body, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text and "/tmp" not in response.text and "site-packages" not in response.text


def test_unknown_routes_and_methods_get_openai_bodies(server):
    for response in (httpx.get(f"{server.url}/v2/nothing"), httpx.get(f"{server.url}/v1/chat/completions")):
        assert response.status_code in (404, 405) and response.json()["error"]["message"]


def test_openai_client_raises_its_own_typed_errors(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], n=3)
    assert "n=3" in str(info.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


# -- load ---------------------------------------------------------------------------------------


def big_webp_url(side: int = 2400) -> str:
    """A lossless WEBP of a few kB that takes about 100 MB to decode (19 bytes a pixel): within every per-image cap."""
    import numpy as np

    ramp = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([ramp, ramp[::-1], np.full_like(ramp, 90)])).save(buf, "WEBP", lossless=True)
    return "data:image/webp;base64," + base64.b64encode(buf.getvalue()).decode()


class SlowClients:
    """Unauthenticated sockets that connect and say nothing, or trickle a header byte now and then."""

    def __init__(self, url: str, idle: int = 20, trickling: int = 10) -> None:
        import socket

        port = int(url.rsplit(":", 1)[1])
        self.idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
        self.trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(trickling)]
        self.stop = threading.Event()
        for s in self.trickling:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        threading.Thread(target=self._trickle, daemon=True).start()

    def _trickle(self) -> None:
        while not self.stop.wait(0.3):
            for s in self.trickling:
                try:
                    s.sendall(b"X")
                except OSError:
                    pass

    def dropped(self) -> int:
        """How many the server has closed (a 408 and end of stream, or a reset)."""
        closed = 0
        for s in self.idle + self.trickling:
            s.settimeout(0.01)
            try:
                data = s.recv(65536)
                closed += data == b"" or data.startswith(b"HTTP/1.1 408")
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        return closed

    def close(self) -> None:
        self.stop.set()
        for s in self.idle + self.trickling:
            s.close()


@pytest.mark.soak
async def test_32_concurrent_clients_mixed_requests_no_5xx_right_verdicts_flat_memory(server):
    """The load test: 32 clients with mixed requests (safe, unsafe, invalid, streamed), among them big
    images (a 2400x2400 WEBP, about 100 MB each to decode) and, alongside, 30 unauthenticated slow
    clients. Every answer is right, the slow clients are dropped, and memory stays bounded by the
    decode budget (--decode-budget-mb 256) and flat across waves."""
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    big = big_webp_url()

    async def one(i: int) -> tuple[str, Any]:
        kind = ("safe", "unsafe", "invalid")[i % 3]
        if kind == "invalid":
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        else:
            text = f"Question {i}: " + (f"where is the {UNSAFE_WORD}?" if kind == "unsafe" else "what is shown?")
            messages = [image_message(text)] if i % 2 else [{"role": "user", "content": text}]
            if i % 8 == 1:  # a big image
                messages = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": big}}]}]
        try:
            if i % 4 == 0:
                stream = await aclient.chat.completions.create(model="x", messages=messages, max_tokens=8, stream=True)
                chunks = [c async for c in stream]
                return kind, chunks[0].model_extra["safety"]["verdict"]
            done = await aclient.chat.completions.create(model="x", messages=messages, max_tokens=8)
            return kind, done.model_extra["safety"]["verdict"]
        except openai.APIStatusError as exc:
            return kind, exc.status_code

    peak = [server.rss_mb()]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peak.append(server.rss_mb())

    async def wave() -> list[tuple[str, Any]]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    await wave()  # warm-up
    rss = [server.rss_mb()]
    slow = SlowClients(server.url)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    results = []
    for _ in range(3):
        results += await wave()
        rss.append(server.rss_mb())
    elapsed = time.perf_counter() - started
    sampling.set()
    sampler.join()
    await aclient.close()
    deadline = time.monotonic() + 10
    while slow.dropped() < 30 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    dropped = slow.dropped()
    slow.close()
    print(f"\n96 requests from 32 concurrent clients (12 with big images) and 30 slow clients in {elapsed:.1f} s; "
          f"server RSS (MB) after each wave: {[round(r, 1) for r in rss]}, peak {max(peak):.0f}")
    for kind, got in results:
        assert got == (400 if kind == "invalid" else kind), (kind, got)
    assert dropped == 30  # every slow client was dropped (--header-timeout 2)
    assert rss[-1] - rss[0] < 40  # flat: no growth with the number of requests
    assert max(peak) - rss[0] < 256 + 200  # the decode budget, plus requests' own working memory


# -- SIGTERM with a request in flight ----------------------------------------------------------


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tiny_model_dir):
    proc = ServerProcess.start(["--model", str(tiny_model_dir("llava")), "--judge", "fixed:safe"])
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 300, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{proc.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data:"):
                events.append(line)
                break
        proc.proc.send_signal(15)  # SIGTERM while the answer is being decoded
        events += [line for line in lines if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    usage_tokens = sum(1 for e in events[1:-2] if '"content"' in e)
    assert usage_tokens > 10  # the answer went on after SIGTERM
    assert proc.stop() == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{proc.url}/health", timeout=2)  # no longer accepting


# -- in-process servers: scripted tokens, not ready, full queue, disconnects --------------------


@pytest.fixture(scope="module")
def tool_model(tiny_model_dir, tmp_path_factory):
    from safecode_guard.testing import build_tool_vlm

    return str(build_tool_vlm("qwen2_5_vl", tmp_path_factory.mktemp("tools") / "qwen"))


def _thread_app(model: str, **settings: Any) -> Any:
    from safecode_guard.serving import ServerSettings, create_app

    judge = settings.pop("judge_object", None)
    app = create_app(ServerSettings(model=model, **settings), judge=judge)
    return app


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_calls_through_the_openai_client(tool_model, script):
    from safecode_guard.testing import call_text

    script.add(call_text("qwen2_5_vl", "get_weather", {"city": "Paris"}), call_text("qwen2_5_vl", "get_weather", {"city": "Rome"}))
    with ThreadServer(_thread_app(tool_model, judge="fixed:safe", max_new_tokens=96)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        done = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], tool_choice="auto"
        )
        call = done.choices[0].message.tool_calls[0]
        assert done.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        stream = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER], stream=True
        )
        deltas = [c for c in stream if c.choices and c.choices[0].delta.tool_calls]
        assert deltas[0].choices[0].delta.tool_calls[0].function.name == "get_weather"
        assert json.loads(deltas[0].choices[0].delta.tool_calls[0].function.arguments) == {"city": "Rome"}


def test_unsafe_tool_calls_are_blocked_on_the_wire(tool_model, script):
    from safecode_guard.testing import call_text

    script.add(call_text("qwen2_5_vl", "get_weather", {"city": "Paris"}))
    with ThreadServer(_thread_app(tool_model, judge="fixed:unsafe", max_new_tokens=96)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        done = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER])
        assert done.choices[0].message.tool_calls is None and done.choices[0].finish_reason != "tool_calls"
        assert done.model_extra["safety"]["verdict"] == "unsafe" and done.model_extra["safety"]["blocked_tool_calls"]


def test_json_response_format(tool_model, script):
    script.add('"answer": 42}')
    with ThreadServer(_thread_app(tool_model, judge="fixed:safe", max_new_tokens=32)) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        done = client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Answer in JSON."}], response_format={"type": "json_object"}
        )
        assert json.loads(done.choices[0].message.content) == {"answer": 42}


def test_per_request_settings_only_when_allowed(tiny_model_dir):
    with ThreadServer(_thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", allow_request_settings=True, max_new_tokens=6)) as srv:
        base = {"messages": [{"role": "user", "content": "hi"}]}
        pinned = httpx.post(f"{srv.url}/v1/chat/completions", json={**base, "safecode": {"verdict": "unsafe"}}).json()
        assert pinned["safety"]["source"] == "override" and pinned["safety"]["refused"] is True
        tuned = httpx.post(f"{srv.url}/v1/chat/completions", json={**base, "safecode": {"threshold": 0.9, "steered_steps": 2}}).json()
        assert (tuned["safety"]["threshold"], tuned["safety"]["steered_steps"]) == (0.9, 2)
        remote = httpx.post(f"{srv.url}/v1/chat/completions", json={**base, "safecode": {"judge": "chat:openai:gpt-4o"}})
        assert remote.status_code == 422  # clients never pick a remote judge
        bad = httpx.post(f"{srv.url}/v1/chat/completions", json={**base, "safecode": {"alpha": -3}})
        assert bad.status_code in (400, 422) and "alpha" in bad.text


def test_before_the_model_is_ready_the_api_answers_503(tiny_model_dir):
    from safecode_guard.serving import ServerSettings, create_app

    app = create_app(ServerSettings(model=str(tiny_model_dir("llava"))), load=False)
    with ThreadServer(app, ready_path="/health") as srv:
        ready = httpx.get(f"{srv.url}/ready")
        answer = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert ready.status_code == answer.status_code == 503
        assert answer.headers["retry-after"] and answer.json()["error"]["code"] == "model_not_ready"


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    from safecode_guard import BatchingConfig

    app = _thread_app(str(tiny_model_dir("qwen2_vl")), judge="fixed:safe", batching=BatchingConfig(max_queue=1, max_batch_rows=2))
    with ThreadServer(app) as srv:
        scheduler = app.state.host.chat.engine.scheduler
        scheduler.on_step = lambda rows: time.sleep(0.01)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40}
        results: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: results.append(httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60))) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        scheduler.on_step = None
    statuses = sorted(r.status_code for r in results)
    assert 200 in statuses and 429 in statuses, statuses
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


def test_a_client_that_disconnects_mid_stream_cancels_its_decoding(tiny_model_dir):
    app = _thread_app(str(tiny_model_dir("llava")), judge="fixed:safe")
    with ThreadServer(app) as srv:
        scheduler = app.state.host.chat.engine.scheduler
        scheduler.on_step = lambda rows: time.sleep(0.005)
        before = scheduler.stats["finished_cancelled"]
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    break  # one event, then the client goes away
        deadline = time.monotonic() + 30
        while scheduler.stats["finished_cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        scheduler.on_step = None
        assert scheduler.stats["finished_cancelled"] == before + 1
        assert scheduler.active_rows == 0


def test_no_cors_headers_unless_asked(tiny_model_dir, server):
    preflight = httpx.options(f"{server.url}/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    with ThreadServer(_thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", cors_origins=("https://app.example",))) as srv:
        ok = httpx.options(f"{srv.url}/v1/chat/completions", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
        assert ok.headers["access-control-allow-origin"] == "https://app.example"


def test_keyword_judge_is_what_the_load_test_expects():
    from safecode_guard.judges import JudgeRequest

    assert keyword_judge(JudgeRequest(images=(), request=f"a {UNSAFE_WORD}")) == "unsafe"
    assert keyword_judge(JudgeRequest(images=(), request="a cat")) == "safe"


def test_bench_serve_prints_latency_ttft_and_throughput(tiny_model_dir, capsys):
    from safecode_guard.cli import main

    with ThreadServer(_thread_app(str(tiny_model_dir("llava")), judge="fixed:safe")) as srv:
        assert main(["bench-serve", "--url", srv.url, "--concurrency", "1,4", "--requests", "4", "--max-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "p99 TTFT" in lines[0] and len(lines) == 3
    for row in lines[1:]:
        fields = row.split()
        assert fields[-1] == "-" and float(fields[3]) > 0  # no errors, some tokens per second
