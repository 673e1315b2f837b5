"""`safecode-guard serve` under hostile clients: what a client can learn and what it can hold.

Servers run in a thread of this process (`ThreadServer`, so tests can script
judges and slow the scheduler) or as a subprocess (`ServerProcess`, for the
connection limits). Each test fails on the code before its fix. No test
asserts a time beyond generous "it did not hang" bounds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import threading
import time
from typing import Any

import httpx
import pytest
from support.servers import ServerProcess, ThreadServer
from support.waiting import wait_until

from safecode_guard import BatchingConfig, InputPolicy, SafeCoDeConfig
from safecode_guard.testing import gradient_image

pytestmark = pytest.mark.allow_hosts(["127.0.0.1"])

KEY = "hardening-key"
HOME = os.path.expanduser("~")


def thread_app(model: str, judge: Any = None, **settings: Any) -> Any:
    from safecode_guard.serving import ServerSettings, create_app

    return create_app(ServerSettings(model=model, **settings), judge=judge)


def chat_body(text: str = "Describe the scene.", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def post(url: str, body: Any, *, raw: bytes | None = None, timeout: float = 60, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def first_event(url: str, body: dict[str, Any]) -> dict[str, Any]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data:"):
                return json.loads(line[5:])
    raise AssertionError("no event")


# -- a failed judge's text never reaches the client --------------------------------------


def leaky_judge(request: Any) -> str:
    raise FileNotFoundError(2, "No such file or directory", f"{HOME}/.config/judge/credentials.json")


def upstream_judge(request: Any) -> str:
    raise RuntimeError("Error code: 401 - {'error': 'Incorrect API key provided: sk-abc***xyz', 'url': 'http://10.0.0.7:8080/v1'}")


def slow_judge(request: Any) -> str:
    time.sleep(3)
    return "safe"


LEAKS = ("credentials.json", HOME, "FileNotFoundError", "sk-abc", "10.0.0.7", "Incorrect API key", "Error code")


@pytest.mark.parametrize(
    ("judge", "config", "code"),
    [
        (leaky_judge, {}, "judge_error"),
        (upstream_judge, {}, "judge_error"),
        (slow_judge, {"judge_timeout_s": 0.3}, "judge_timeout"),
        (lambda request: "I would rather not say", {}, "judge_unparseable"),
    ],
    ids=["local-path", "upstream-401", "timeout", "unparseable"],
)
def test_a_failed_judge_is_a_fixed_code_on_the_wire_and_details_in_the_log(tiny_model_dir, caplog, judge, config, code):
    app = thread_app(str(tiny_model_dir("llava")), judge=judge, safecode=SafeCoDeConfig(**config))
    with caplog.at_level("WARNING", logger="safecode_guard.serving"), ThreadServer(app) as srv:
        answer = post(srv.url, chat_body())
        event = first_event(srv.url, chat_body())
    assert answer.status_code == 200, answer.text
    safety = answer.json()["safety"]
    assert (safety["verdict"], safety["source"], safety["error"]) == ("unsafe", "fallback", code)
    assert event["safety"]["error"] == code
    for leak in LEAKS:
        assert leak not in answer.text and leak not in json.dumps(event)
    if judge in (leaky_judge, upstream_judge):  # the details stay on the server, in its log
        assert any(("credentials.json" in r.getMessage() or "sk-abc" in r.getMessage()) for r in caplog.records)


def test_a_judge_failure_that_fails_the_request_names_only_its_code(tiny_model_dir):
    app = thread_app(str(tiny_model_dir("llava")), judge=leaky_judge, safecode=SafeCoDeConfig(on_judge_error="raise"))
    with ThreadServer(app) as srv:
        answer = post(srv.url, chat_body())
    assert answer.status_code == 502 and "judge_error" in answer.json()["error"]["message"]
    for leak in LEAKS:
        assert leak not in answer.text


def test_judge_error_codes():
    from safecode_guard.judges import judge_error_code

    assert judge_error_code(None) is None
    assert judge_error_code("TimeoutError: judge 'x' gave no verdict") == "judge_timeout"
    assert judge_error_code("JudgeBusyError: all 32 judge threads are busy") == "judge_busy"
    assert judge_error_code("InvalidVerdictError: could not find 'safe'") == "judge_unparseable"
    assert judge_error_code("OSError: /home/me/key") == "judge_error"
    assert judge_error_code("no colon at all") == "judge_error"


def test_local_paths_never_reach_a_client():
    from safecode_guard.errors import UnsupportedModelError
    from safecode_guard.serving.app import error_response

    body = error_response(UnsupportedModelError(f"The chat template failed: {HOME}/models/x/chat_template.jinja line 3")).body
    assert HOME.encode() not in body and b"chat_template.jinja" not in body and b"<path>" in body


# -- the schema pages, and numbers no client data may turn into a 500 ----------


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    from support.servers import allow_loopback

    allow_loopback()
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", api_key=KEY)
    with ThreadServer(app) as srv:
        yield srv


def test_the_schema_pages_are_off_by_default(keyed):
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
            assert httpx.get(f"{keyed.url}{path}", headers=headers).status_code == 404, path


def test_the_schema_pages_when_asked_for_need_the_key(tiny_model_dir):
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", api_key=KEY, docs=True)
    with ThreadServer(app) as srv:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(f"{srv.url}{path}").status_code == 401, path
            assert httpx.get(f"{srv.url}{path}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
        schema = httpx.get(f"{srv.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert "/v1/chat/completions" in schema["paths"]


HUGE = "9" * 5000  # more digits than Python converts (sys.int_info.default_max_str_digits)
LONG = "9" * 4000  # converts, absurd anyway
NUMBER_CASES = {
    "seed 5000 digits": '"seed": ' + HUGE,
    "max_tokens 5000 digits": '"max_tokens": ' + HUGE,
    "seed 4000 digits": '"seed": ' + LONG,
    "max_tokens 4000 digits": '"max_tokens": ' + LONG,
    "max_completion_tokens 4000 digits": '"max_completion_tokens": ' + LONG,
    "n 4000 digits": '"n": ' + LONG,
    "logit_bias superscript key": '"logit_bias": {"\\u00b2": 1}',
    "logit_bias arabic digit key": '"logit_bias": {"\\u0663": 1}',
    "logit_bias 5000-digit key": '"logit_bias": {"' + HUGE + '": 1}',
    "logit_bias huge bias": '"logit_bias": {"5": ' + LONG + "}",
    "temperature 1e400": '"temperature": 1e400',
    "top_p NaN": '"top_p": NaN',
    "frequency_penalty -Infinity": '"frequency_penalty": -Infinity',
    "logit_bias NaN bias": '"logit_bias": {"5": NaN}',
}


@pytest.mark.parametrize("case", sorted(NUMBER_CASES))
def test_absurd_numbers_are_400s_never_500s(keyed, case):
    raw = ('{"messages": [{"role": "user", "content": "hi"}], ' + NUMBER_CASES[case] + "}").encode()
    answer = post(keyed.url, None, raw=raw, key=KEY)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert answer.json()["error"]["message"] and "Traceback" not in answer.text


def test_logit_bias_keys_are_ascii_token_ids(tiny_vlm):
    from safecode_guard import SafeCoDe, SafeCoDeInputError

    engine = SafeCoDe(*tiny_vlm, judge="fixed:safe")
    for key in ("\u00b2", "\u0663", "9" * 5000, "-1", "", " "):
        with pytest.raises(SafeCoDeInputError, match="logit_bias"):
            engine._check_logit_bias({key: 1.0})
    assert engine._check_logit_bias({" 5 ": 1.0, 7: -1.0}) == {5: 1.0, 7: -1.0}


async def test_a_content_length_of_thousands_of_digits_is_413_not_500():
    from safecode_guard.serving.app import BodySizeLimit

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not run")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"content-length", b"9" * 5000)]}
    await BodySizeLimit(app, 1024)(scope, receive, send)
    assert sent[0]["status"] == 413


# -- --request-timeout covers the judge -----------------------------------------------


def test_the_request_timeout_covers_judge_time(tiny_model_dir):
    app = thread_app(str(tiny_model_dir("llava")), judge=slow_judge, batching=BatchingConfig(request_timeout_s=1.0))
    with ThreadServer(app) as srv:
        start = time.perf_counter()
        answer = post(srv.url, chat_body())
        took = time.perf_counter() - start
        stream = httpx.post(f"{srv.url}/v1/chat/completions", json={**chat_body(), "stream": True}, timeout=60)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "request_timeout", answer.text
    assert "--request-timeout" in answer.json()["error"]["message"]
    assert took < 2.9  # not the judge's 3 s
    assert stream.status_code == 504


# -- a client that leaves takes its work with it -----------------------------------------


def test_a_non_streaming_client_that_leaves_cancels_its_decoding(tiny_model_dir):
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe")
    with ThreadServer(app) as srv:
        scheduler = app.state.host.chat.engine.scheduler
        scheduler.on_step = lambda rows: time.sleep(0.005)
        before = scheduler.stats["finished_cancelled"]
        with pytest.raises(httpx.ReadTimeout):
            post(srv.url, chat_body("Tell me everything.", max_tokens=1500), timeout=1.0)
        assert wait_until(lambda: scheduler.stats["finished_cancelled"] == before + 1)
        assert wait_until(lambda: scheduler.active_rows == 0)
        scheduler.on_step = None
        assert scheduler.stats["finished_length"] == 0  # nothing ran to its end for nobody


class GatedJudge:
    """A judge that waits for `release` (a slow remote judge) and counts its calls."""

    name = "gated"

    def __init__(self) -> None:
        self.release, self.calls = threading.Event(), 0

    def __call__(self, request: Any) -> str:
        self.calls += 1
        self.release.wait(30)
        return "safe"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_during_the_judge_is_never_queued(tiny_model_dir, stream):
    judge = GatedJudge()
    app = thread_app(str(tiny_model_dir("llava")), judge=judge)
    with ThreadServer(app) as srv:
        scheduler = app.state.host.chat.engine.scheduler
        prefills: list[int] = []
        original = scheduler.decoder.prefill
        scheduler.decoder.prefill = lambda *a, **k: (prefills.append(1), original(*a, **k))[1]  # type: ignore[method-assign]
        with pytest.raises(httpx.ReadTimeout):
            post(srv.url, chat_body(stream=stream, max_tokens=50), timeout=0.5)
        assert wait_until(lambda: judge.calls == 1)
        time.sleep(0.5)  # the server notices the client left and stops waiting for the judge
        judge.release.set()  # the judge thread (which cannot be killed) returns; its verdict is discarded
        time.sleep(1.0)
        assert prefills == [] and scheduler.queue_depth == 0 and scheduler.stats["finished_length"] == 0
        scheduler.decoder.prefill = original  # type: ignore[method-assign]
        assert post(srv.url, chat_body()).status_code == 200


def test_many_clients_timing_out_leave_room_for_the_next_request(tiny_model_dir):
    """vLLM's cancellation scenario, scaled to this machine: 48 clients give up after 0.5 s on
    1500-token answers; a request right after them, with a 5 s budget, must be answered."""
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe")
    with ThreadServer(app) as srv:
        scheduler = app.state.host.chat.engine.scheduler
        scheduler.on_step = lambda rows: time.sleep(0.002)

        async def impatient() -> None:
            async with httpx.AsyncClient(timeout=0.5) as client:
                body = chat_body("Tell me everything about the scene.", max_tokens=1500)
                with pytest.raises(httpx.TimeoutException):
                    await client.post(f"{srv.url}/v1/chat/completions", json=body)

        async def crowd() -> None:
            await asyncio.gather(*(impatient() for _ in range(48)))

        asyncio.run(crowd())
        answer = post(srv.url, chat_body("What is shown?", max_tokens=8), timeout=5.0)
        scheduler.on_step = None
        assert answer.status_code == 200, answer.text
        assert wait_until(lambda: scheduler.active_rows == 0 and scheduler.queue_depth == 0)
        assert scheduler.stats["finished_length"] <= 1  # only the follow-up ran to its end


# -- preparation is linear, capped before any work, and stops when the client leaves ----


def one_liners(n: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"line {i}"} for i in range(n)]


def test_merging_many_same_role_messages_is_linear():
    """100,000 one-line user messages merge into one turn. The old merge copied the turn per message
    (about 1.5e10 element copies here: many minutes); a linear one takes seconds. The bound is a hang
    guard, 30x or more above what the linear merge needs on this shared machine."""
    from safecode_guard.prompting import parse_messages

    policy = InputPolicy(max_messages=200_000, max_content_parts=200_000)
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(parse_messages(one_liners(100_000), policy)), daemon=True)
    worker.start()
    worker.join(60)
    assert done, "merging 100,000 messages did not finish within 60 s"
    (turn,) = done[0].messages
    assert len(turn["content"]) == 2 * 100_000 - 1 and turn["content"][-1]["text"] == "line 99999"


def test_merge_turns_is_linear_and_leaves_its_input_alone():
    from safecode_guard.chat_model import merge_turns

    turns = [{"role": "user", "content": [{"type": "text", "text": f"{i}"}]} for i in range(100_000)]
    done: list[Any] = []
    worker = threading.Thread(target=lambda: done.append(merge_turns(turns)), daemon=True)
    worker.start()
    worker.join(60)
    assert done, "merge_turns did not finish within 60 s"
    assert len(done[0]) == 1 and len(done[0][0]["content"]) == 2 * 100_000 - 1
    assert turns[0]["content"] == [{"type": "text", "text": "0"}]  # the caller's lists are not extended


def test_message_and_part_caps_come_before_any_work(monkeypatch):
    from langchain_core.messages import HumanMessage

    from safecode_guard import InputLimitError
    from safecode_guard.lc_messages import to_hf_messages
    from safecode_guard.prompting import parse_messages

    def no_images(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be decoded before the caps are checked")

    monkeypatch.setattr("safecode_guard.images.load_images", no_images)
    monkeypatch.setattr("safecode_guard.langchain.messages.load_images", no_images)
    bad_image = {"type": "image", "image": "data:image/png;base64,AAAA"}
    policy = InputPolicy()
    with pytest.raises(InputLimitError, match="max_messages"):
        parse_messages([*one_liners(1024), {"role": "user", "content": [bad_image]}], policy)
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}] * 4000}, {"role": "user", "content": [bad_image] * 97}]
    with pytest.raises(InputLimitError, match="max_content_parts"):
        parse_messages(parts, policy)
    with pytest.raises(InputLimitError, match="max_messages"):
        to_hf_messages([HumanMessage("hi")] * 1025, policy)
    with pytest.raises(InputLimitError, match="max_content_parts"):
        to_hf_messages([HumanMessage([{"type": "text", "text": "x"}] * 4097)], policy)


def test_the_server_checks_the_caps_before_converting(keyed, monkeypatch):
    def no_conversion(messages: Any) -> Any:
        raise AssertionError("converted before the caps were checked")

    monkeypatch.setattr("safecode_guard.serving.app.to_langchain", no_conversion)
    too_many = post(keyed.url, {"messages": one_liners(1025)}, key=KEY)
    assert too_many.status_code == 400 and "max_messages" in too_many.json()["error"]["message"]
    parts = [{"type": "text", "text": "x"}] * 4097
    too_many_parts = post(keyed.url, {"messages": [{"role": "user", "content": parts}]}, key=KEY)
    assert too_many_parts.status_code == 400 and "max_content_parts" in too_many_parts.json()["error"]["message"]


def png_data_url(size: tuple[int, int] = (64, 48)) -> str:
    import base64

    buf = io.BytesIO()
    gradient_image(*size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_a_client_that_leaves_stops_its_preparation(tiny_model_dir, monkeypatch):
    """Eight images, each slow to decode; the client leaves during the first: the rest are never decoded."""
    from safecode_guard import images

    decoded: list[int] = []
    original = images.decode_opened

    def slow_decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        time.sleep(0.4)
        return original(*args, **kwargs)

    monkeypatch.setattr(images, "decode_opened", slow_decode)
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe")
    content = [{"type": "image_url", "image_url": {"url": png_data_url()}} for _ in range(8)]
    content.append({"type": "text", "text": "Compare them."})
    with ThreadServer(app) as srv:
        with pytest.raises(httpx.ReadTimeout):
            post(srv.url, {"messages": [{"role": "user", "content": content}], "max_tokens": 4}, timeout=0.3)
        time.sleep(4.0)  # eight decodes would take 3.2 s
    assert 1 <= len(decoded) <= 3, decoded


# -- JSON within a structure budget, parsed off the event loop ---------------------------


def test_json_structure_budget():
    from safecode_guard.serving.body import JSONBudgetError, json_values_bound, parse_json_body

    assert json_values_bound(b'[1,[2,{"a":3}]]') >= 5
    with pytest.raises(JSONBudgetError) as info:
        parse_json_body(b"[" + b"{}," * 200_000 + b"{}]", max_items=100_000)
    assert info.value.code == "too_many_json_values"
    # commas inside strings are not values: the exact count lets a long text through
    text = {"messages": [{"role": "user", "content": "a, b, [c], {d}, " * 100_000}]}
    assert parse_json_body(json.dumps(text).encode(), max_items=1000) == text
    with pytest.raises(JSONBudgetError) as info:
        parse_json_body(b'{"a":' * 65 + b"1" + b"}" * 65, max_depth=64)
    assert info.value.code == "nesting_too_deep"
    assert parse_json_body(b'{"a":' * 64 + b"1" + b"}" * 64, max_depth=64)
    for bad in (b"{nope", b'{"seed": ' + b"9" * 5000 + b"}", b"\xff\xfe"):
        with pytest.raises(JSONBudgetError) as info:
            parse_json_body(bad)
        assert info.value.code == "invalid_json"


def test_a_body_of_millions_of_values_is_refused_before_parsing(tiny_model_dir, monkeypatch):
    from safecode_guard.serving import body as body_module

    parsed: list[int] = []
    counting = type("CountingJSON", (), {
        "loads": staticmethod(lambda data: (parsed.append(1), json.loads(data))[1]),
        "JSONDecodeError": json.JSONDecodeError,
    })
    monkeypatch.setattr(body_module, "json", counting)
    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", max_body_bytes=16 * 2**20)
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "metadata": [' + b"{}," * 3_000_000 + b"{}]}"
    with ThreadServer(app) as srv:
        answer = post(srv.url, None, raw=raw)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "too_many_json_values"
    assert parsed == []  # refused from the count alone


# -- the decode-memory budget on the wire ------------------------------------------------


@pytest.fixture
def default_budget_after():
    from safecode_guard.images.budget import DEFAULT_DECODE_BUDGET_MB, set_decode_memory_budget

    yield
    set_decode_memory_budget(DEFAULT_DECODE_BUDGET_MB)


def test_a_decode_that_waits_too_long_for_memory_gets_429(tiny_model_dir, default_budget_after):
    from safecode_guard.images.budget import decode_memory_budget

    app = thread_app(str(tiny_model_dir("llava")), judge="fixed:safe", decode_budget_mb=64, decode_wait_s=0.3)
    image = {"type": "image_url", "image_url": {"url": png_data_url((1500, 1500))}}  # about 16 MB to decode
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}], "max_tokens": 2}
    with ThreadServer(app) as srv:
        release, held = threading.Event(), threading.Event()

        def other_requests() -> None:  # what other requests hold right now
            with decode_memory_budget.hold(60 * 2**20):
                held.set()
                release.wait(30)

        holder = threading.Thread(target=other_requests)
        holder.start()
        assert held.wait(10)
        busy = post(srv.url, body)
        release.set()
        holder.join(10)
        calm = post(srv.url, body)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
    assert busy.json()["error"]["code"] == "overloaded" and "decode" in busy.json()["error"]["message"]
    assert calm.status_code == 200, calm.text


# -- idle, slow and oversized connections -----------------------------------------------


def _closed_by_server(sock: socket.socket, within: float) -> bytes | None:
    """What the server sent before closing `sock` within `within` seconds, or None if still open."""
    sock.settimeout(within)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return got
    except TimeoutError:
        return None


def test_idle_and_slow_clients_are_dropped_while_others_are_served(tiny_model_dir):
    proc = ServerProcess.start([
        "--model", str(tiny_model_dir("llava")), "--judge", "fixed:safe", "--api-key", KEY, "--max-new-tokens", "4",
        "--header-timeout", "1", "--keep-alive", "1", "--max-connections", "150",
    ])
    port = int(proc.url.rsplit(":", 1)[1])
    stop = threading.Event()
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]  # connect, say nothing
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        for s in slow:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")

        def trickle() -> None:  # slowloris: a header byte every 0.2 s, never finishing
            while not stop.is_set():
                for s in slow:
                    try:
                        s.sendall(b"X")
                    except OSError:
                        pass
                stop.wait(0.2)

        threading.Thread(target=trickle, daemon=True).start()
        # everyone else is served meanwhile (no key needed for /health; the API with it)
        assert httpx.get(f"{proc.url}/health", timeout=10).status_code == 200
        answer = post(proc.url, chat_body(), key=KEY, timeout=30)
        assert answer.status_code == 200, answer.text
        # within the header timeout (plus slack), the server closed every idle and slow connection
        for s in idle + slow:
            sent = _closed_by_server(s, 10)
            assert sent is not None, "a silent or trickling client kept its connection"
            assert sent == b"" or sent.startswith(b"HTTP/1.1 408")
        # a kept-alive connection that goes quiet after its answer is closed too (--keep-alive 1)
        kept = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_server(kept, 10) is not None
        # a head over the size cap: 400, closed
        big = socket.create_connection(("127.0.0.1", port))
        big.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (80 * 1024) + b"\r\n\r\n")
        reply = _closed_by_server(big, 10)
        assert reply is not None and reply.startswith(b"HTTP/1.1 400")
        # past the connection cap new requests get a prompt 503, and the cap frees as idlers are dropped
        crowd = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
        assert httpx.get(f"{proc.url}/health", timeout=10).status_code == 503
        assert wait_until(lambda: httpx.get(f"{proc.url}/health", timeout=10).status_code == 200, 15)
        for s in idle + slow + crowd + [kept, big]:
            s.close()
    finally:
        stop.set()
        assert proc.stop() == 0


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(tiny_vlm, monkeypatch):
    """The largest body the server allows held one 63 MB message: tokenizing it only to count its tokens
    took minutes and 12 GB. Every token stands for at most its vocabulary entry's length, so such a
    prompt is refused from its length in characters."""
    from safecode_guard import InputLimitError, SafeCoDe
    from safecode_guard.engine import core as engine_module

    engine = SafeCoDe(*tiny_vlm, judge="fixed:safe")
    assert engine._token_chars >= 1 and engine.context_length is not None
    bound = 4 * engine._token_chars * (engine.context_length - 4)

    def no_tokenizing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("tokenized a prompt that could never fit")

    monkeypatch.setattr(engine_module, "encode_rows", no_tokenizing)  # the engine's one call into the processor
    with pytest.raises(InputLimitError, match="characters"):
        engine.generate([{"role": "user", "content": "x" * (bound + 1)}], max_new_tokens=4)
    monkeypatch.undo()
    # below that bound the tokenizer decides, as before
    with pytest.raises(InputLimitError, match="context"):
        engine.generate([{"role": "user", "content": "x " * (engine.context_length + 10)}], max_new_tokens=4)
    assert engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2).text is not None
