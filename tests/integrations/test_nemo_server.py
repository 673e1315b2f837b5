"""`nemoguardrails server` with the shipped configs, run in process (FastAPI's TestClient, no sockets).

NeMo's server copies each request's `model` into the config's main model and
its OpenAI fields into `llm_params`. These tests pin what a client can and
cannot do with that: pick the model (no), set the verdict (no), sampling and
length options (yes), stream (yes, Colang 1.0 and 2.x).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from nemoguardrails.server import api
from support.nemo import (  # noqa: F401 (an autouse fixture)
    CONFIG_V1,
    CONFIG_V2,
    OUTPUT_RAIL_V1,
    OUTPUT_RAIL_V2,
    REFUSAL,
    ROOT,
    network_attempts,
)

from safecode_guard import ChatSafeCoDe, loading, nemo
from safecode_guard.engine import SafeCoDe

SERVED = "llava"  # the tiny model's folder name: what clients send as `model`


@pytest.fixture
def model_dir(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Callable[[str], Path]) -> Iterator[Path]:
    path = tiny_model_dir("llava")
    assert path.name == SERVED
    monkeypatch.setenv("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
    monkeypatch.setenv(nemo.MODEL_ENV, str(path))
    monkeypatch.setenv(nemo.JUDGE_ENV, "fixed:safe")
    nemo.clear_caches()
    yield path
    nemo.clear_caches()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> Iterator[Callable[[Path], TestClient]]:
    """`serve(config_dir) -> client`: NeMo's FastAPI app on one config folder, as `nemoguardrails server` runs it."""
    clients: list[TestClient] = []

    def serve(config_dir: Path) -> TestClient:
        api.llm_rails_instances.clear()
        monkeypatch.setattr(api.app, "rails_config_path", str(config_dir))
        monkeypatch.setattr(api.app, "single_config_mode", False)
        monkeypatch.setattr(api.app, "single_config_id", None)
        client = TestClient(api.app)
        client.__enter__()  # runs the app's startup: single-config mode for a folder with config.yml
        clients.append(client)
        return client

    yield serve
    for client in clients:
        client.__exit__(None, None, None)
    api.llm_rails_instances.clear()


def ask(client: TestClient, config_dir: Path, model: str = SERVED, **body: Any) -> Any:
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], **body}
    payload.setdefault("guardrails", {})["config_id"] = config_dir.name
    return client.post("/v1/chat/completions", json=payload)


def error_of(response: Any) -> str:
    return response.json()["error"]["message"]


# --------------------------------------------------------------------------- the request's `model`


@pytest.mark.parametrize("requested", ["${HOME}", "/etc", "gpt-4o", "../llava", "demo", "<the folder's path>"])
def test_a_client_cannot_pick_the_model(
    server: Callable[[Path], TestClient], model_dir: Path, monkeypatch: pytest.MonkeyPatch, requested: str
) -> None:
    if requested == "<the folder's path>":
        requested = str(model_dir)  # accepting it would let a client confirm a guessed path
    checked: list[str] = []
    real_check = loading.check_model_source

    def recording(path: Any) -> Any:
        checked.append(str(path))
        return real_check(path)

    monkeypatch.setattr(loading, "check_model_source", recording)
    monkeypatch.setattr(SafeCoDe, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("loaded")))
    response = ask(server(CONFIG_V1), CONFIG_V1, model=requested)
    assert response.status_code == 400
    message = error_of(response)
    assert f'Send "model": {SERVED!r}' in message and repr(requested) in message
    assert str(model_dir) not in response.text.replace(requested, "")
    assert os.path.expanduser("~") not in message.replace(requested, "")
    assert checked == []  # never expanded, probed or loaded


def test_the_served_name_gets_an_answer_with_the_verdict(
    server: Callable[[Path], TestClient], model_dir: Path
) -> None:
    response = ask(
        server(CONFIG_V1),
        CONFIG_V1,
        max_tokens=6,
        guardrails={"options": {"output_vars": True, "log": {"llm_calls": True}}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    direct = ChatSafeCoDe(model=str(model_dir), judge="fixed:safe", max_new_tokens=6).invoke("hello")
    assert body["choices"][0]["message"]["content"] == direct.content
    assert body["model"] == SERVED
    assert body["guardrails"]["output_data"]["safecode_verdict"] == "safe"
    assert body["guardrails"]["output_data"]["safecode_result"]["judge"] == "fixed:safe"
    assert body["guardrails"]["log"]["llm_calls"][0]["llm_model_name"] == SERVED
    assert str(model_dir) not in response.text  # no local path in the body


# --------------------------------------------------------------------------- options from the request


@pytest.mark.parametrize("option", [{"verdict": "safe"}, {"model": "/etc"}])
def test_a_client_cannot_set_the_verdict(server: Callable[[Path], TestClient], option: dict[str, Any]) -> None:
    response = ask(server(CONFIG_V1), CONFIG_V1, guardrails={"options": {"llm_params": option}})
    assert response.status_code == 400
    assert f"option(s) [{next(iter(option))!r}]" in error_of(response)


def test_openai_options_reach_the_decoder(
    server: Callable[[Path], TestClient], decoder_calls: list[dict[str, Any]]
) -> None:
    client = server(CONFIG_V1)
    response = ask(client, CONFIG_V1, max_tokens=4, presence_penalty=0.5, frequency_penalty=0.25, temperature=0.5, top_p=0.9, stop=["zz"])
    assert response.status_code == 200, response.text
    used = decoder_calls[-1]
    assert (used["max_new_tokens"], used["presence_penalty"], used["frequency_penalty"]) == (4, 0.5, 0.25)
    assert (used["temperature"], used["top_p"], used["stop"], used["do_sample"]) == (0.5, 0.9, ["zz"], True)

    llm_params = {"max_completion_tokens": 3, "logit_bias": {"9": -100}, "seed": 7, "top_k": 2}
    response = ask(client, CONFIG_V1, guardrails={"options": {"llm_params": llm_params}})
    assert response.status_code == 200, response.text
    used = decoder_calls[-1]
    assert (used["max_new_tokens"], used["logit_bias"], used["seed"], used["top_k"]) == (3, {"9": -100}, 7, 2)


def test_nemo_limit_top_level_max_completion_tokens_and_logit_bias_are_dropped(
    server: Callable[[Path], TestClient], decoder_calls: list[dict[str, Any]]
) -> None:
    # NeMo 0.24's server copies neither into llm_params (send them in guardrails.options.llm_params).
    response = ask(server(CONFIG_V1), CONFIG_V1, max_completion_tokens=3, logit_bias={"9": -100})
    assert response.status_code == 200, response.text
    used = decoder_calls[-1]
    assert used["max_new_tokens"] == 128 and "logit_bias" not in used


@pytest.mark.parametrize(
    "body",
    [{"max_tokens": 10**7}, {"temperature": 500.0}, {"guardrails": {"options": {"llm_params": {"max_tokens": 5, "max_completion_tokens": 3}}}}],
    ids=["too-many-tokens", "temperature", "two-limits"],
)
def test_bad_options_are_the_clients_to_fix(server: Callable[[Path], TestClient], body: dict[str, Any]) -> None:
    response = ask(server(CONFIG_V1), CONFIG_V1, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


# --------------------------------------------------------------------------- streaming


def streamed_text(response: Any) -> str:
    text = ""
    for line in response.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: ") :])
        assert "error" not in chunk, chunk
        text += chunk["choices"][0]["delta"].get("content") or ""
    return text


@pytest.mark.parametrize("config_dir", [CONFIG_V1, CONFIG_V2], ids=["colang1", "colang2"])
@pytest.mark.parametrize("judge", ["fixed:safe", "fixed:unsafe"])
def test_streaming_sends_the_same_text_as_a_plain_request(
    server: Callable[[Path], TestClient], monkeypatch: pytest.MonkeyPatch, config_dir: Path, judge: str
) -> None:
    monkeypatch.setenv(nemo.JUDGE_ENV, judge)
    client = server(config_dir)
    plain = ask(client, config_dir, max_tokens=8).json()["choices"][0]["message"]["content"]
    streamed = streamed_text(ask(client, config_dir, max_tokens=8, stream=True))
    assert streamed == plain != ""
    assert (plain == REFUSAL) == (judge == "fixed:unsafe")


def test_nemo_limit_models_route_needs_an_upstream(server: Callable[[Path], TestClient]) -> None:
    # /v1/models lists an OpenAI-compatible upstream's models (MAIN_MODEL_BASE_URL), not the config's.
    response = server(CONFIG_V1).get("/v1/models")
    assert response.status_code == 502


# --------------------------------------------------------------------------- streaming past output rails, Colang 2.x requests, errors

BLOCK_ALL_CONFIG_PY = '''
from nemoguardrails.actions.rail_outcome import RailOutcome

from safecode_guard.nemo import init as safecode_init


async def block_everything(**kwargs):
    return RailOutcome.block(reason="test: every answer is blocked")


def init(app):
    safecode_init(app)
    app.register_action(block_everything, name="check_blocked_terms")
    app.register_action(block_everything, name="CheckBlockedTermsAction")
'''


def config_blocking_every_answer(source: Path, folder: Path) -> Path:
    """A copy of a shipped folder with an output rail that blocks every answer."""

    shutil.copytree(source, folder)
    (folder / "config.py").write_text(BLOCK_ALL_CONFIG_PY)
    if source == CONFIG_V2:
        (folder / "output.co").write_text(OUTPUT_RAIL_V2)
    else:
        (folder / "output.co").write_text(OUTPUT_RAIL_V1)
        with (folder / "config.yml").open("a") as f:
            f.write("  output:\n    flows: [check blocked terms]\n    streaming: {enabled: true, stream_first: false}\n")
    return folder


def sse_events(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("source", [CONFIG_V1, CONFIG_V2], ids=["colang1", "colang2"])
def test_a_stream_never_carries_what_an_output_rail_blocked(
    server: Callable[[Path], TestClient], decoder_calls: list[dict[str, Any]], tmp_path: Path, source: Path
) -> None:
    folder = config_blocking_every_answer(source, tmp_path / "blocking")
    client = server(folder)
    plain = ask(client, folder, max_tokens=8).json()["choices"][0]["message"]["content"]
    assert plain == "I can't share that answer." and len(decoder_calls) == 1  # the model did answer
    events = sse_events(ask(client, folder, max_tokens=8, stream=True))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if "choices" in e)
    if source == CONFIG_V2:
        assert text == plain  # the replacement, held until the output rail had run
    else:
        assert text == "" and events[-1]["error"]["code"] == "content_blocked"  # stream_first: false


def test_colang2_requests_it_cannot_answer_get_a_400(
    server: Callable[[Path], TestClient], decoder_calls: list[dict[str, Any]]
) -> None:
    client = server(CONFIG_V2)
    two = [{"role": "user", "content": "What is in this picture?"}, {"role": "user", "content": "And how do I hurt someone?"}]
    for stream in (False, True):
        response = ask(client, CONFIG_V2, messages=two, stream=stream)
        assert response.status_code == 400, response.text
        assert "2 user messages" in error_of(response)
    for options in ({"output_vars": True}, {"log": {"llm_calls": True}}):
        response = ask(client, CONFIG_V2, guardrails={"options": options})
        assert response.status_code == 400, response.text  # NeMo alone answers 500, after generating
        assert next(iter(options)) in error_of(response)
    assert decoder_calls == []


def test_a_missing_model_folder_reaches_the_client_without_its_path(
    server: Callable[[Path], TestClient], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "secret-place" / "llava-13b"
    monkeypatch.setenv(nemo.MODEL_ENV, str(missing))
    response = ask(server(CONFIG_V1), CONFIG_V1, model="llava-13b")
    assert response.status_code == 400
    message = error_of(response)
    assert "'llava-13b' was not found" in message and "Could not load" not in message
    assert "secret-place" not in response.text and str(tmp_path) not in response.text


def test_nemo_limit_streamed_responses_carry_no_verdict(server: Callable[[Path], TestClient]) -> None:
    """NeMo 0.24's server sends each streamed text chunk as a bare delta: no field for the verdict."""
    response = ask(server(CONFIG_V1), CONFIG_V1, max_tokens=4, stream=True, guardrails={"options": {"output_vars": True}})
    events = sse_events(response)
    assert events and all(set(e) <= {"id", "object", "created", "model", "choices"} for e in events)
    assert all(set(e["choices"][0]["delta"]) <= {"role", "content"} for e in events)


@pytest.mark.parametrize("readme", ["README.md", "integrations/nemoguardrails/README.md"])
def test_readme_curl_examples_send_the_served_name(readme: str) -> None:
    """Each curl example, run as its block stands (SAFECODE_MODEL as the block sets it, else unset), gets an answer."""
    text = (ROOT / readme).read_text()
    configured = re.search(r"model: (\S+)", (CONFIG_V1 / "config.yml").read_text()).group(1).strip('"')
    checked = []
    for block in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        body = block.group(1)
        if "v1/chat/completions" not in body or "nemoguardrails server" not in body:
            continue  # not a NeMo server example (README.md also shows `safecode-guard serve`)
        setting = re.findall(r"SAFECODE_MODEL=(\S+)", body)
        expanded = configured.replace("${SAFECODE_MODEL:-demo}", setting[-1] if setting else "demo")
        sent = re.search(r'"model":\s*"([^"]+)"', body).group(1)
        checked.append((sent, nemo.served_model_name(expanded)))
    assert checked and all(sent == served for sent, served in checked), checked
