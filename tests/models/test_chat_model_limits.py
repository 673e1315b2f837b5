"""`ChatSafeCoDe` under bad input, limits, judge faults, concurrency and load: fails fast and typed, stays usable.

Image decoding itself is covered exhaustively in tests/unit/test_images.py; here we check
that the chat model fails fast and typed, before any model work, and stays usable.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import threading
import time

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from PIL import Image
from support.waiting import rss_mb

from safecode_guard import (
    ChatSafeCoDe,
    ImageInputError,
    InputLimitError,
    InputPolicy,
    SafeCoDeConfig,
)
from safecode_guard.engine.adapters import Decoder


def png_b64(color=(200, 30, 30), size=(40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, data: str, mime: str = "image/png") -> HumanMessage:
    return HumanMessage([{"type": "image", "base64": data, "mime_type": mime}, {"type": "text", "text": text}])


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatSafeCoDe(model=str(tiny_model_dir("llava")), judge="fixed:safe", max_new_tokens=6)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if a prefill starts: bad input must be refused before any model work."""

    def refuse(self, *args):
        raise AssertionError("the model ran on bad input")

    for step in ("encode_images", "run_chunk", "step"):  # the vision tower, a prefill chunk, a decode step
        monkeypatch.setattr(Decoder, step, refuse)


BAD_IMAGES = {
    "corrupt bytes": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50).decode(),
    "truncated png": base64.b64encode(base64.b64decode(png_b64(size=(64, 64)))[:60]).decode(),
    "text, not an image": base64.b64encode(b"hello, I am text").decode(),
    "invalid base64": "!!!not-base64!!!",
    "empty": "",
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_fail_fast_typed_and_before_model_work(chat, no_model_work, case):
    start = time.perf_counter()
    with pytest.raises(ImageInputError) as info:
        chat.invoke([image_message("What is this?", BAD_IMAGES[case])])
    assert time.perf_counter() - start < 5.0  # generous: shared CI machines; typically milliseconds
    assert isinstance(info.value, ValueError) and len(str(info.value)) > 30


def test_model_stays_usable_after_bad_input(chat):
    with pytest.raises(ImageInputError):
        chat.invoke([image_message("What is this?", BAD_IMAGES["corrupt bytes"])])
    good = chat.invoke([image_message("What is this?", png_b64())])
    assert good.response_metadata["safety"]["verdict"] == "safe"


def test_decompression_bomb_is_refused_from_the_header(tiny_model_dir, no_model_work):
    small_cap = ChatSafeCoDe(
        model=str(tiny_model_dir("llava")), judge="fixed:safe", policy=InputPolicy(max_image_pixels=1000)
    )
    with pytest.raises(ImageInputError, match="max_image_pixels"):
        small_cap.invoke([image_message("What is this?", png_b64(size=(100, 100)))])


def test_too_many_images_and_too_long_prompts(tiny_model_dir, no_model_work):
    strict = ChatSafeCoDe(
        model=str(tiny_model_dir("llava")),
        judge="fixed:safe",
        policy=InputPolicy(max_images=1, max_prompt_tokens=40),
    )
    two = HumanMessage(
        [{"type": "image", "base64": png_b64(), "mime_type": "image/png"}] * 2 + [{"type": "text", "text": "Compare."}]
    )
    with pytest.raises(InputLimitError, match="max_images"):
        strict.invoke([two])


def test_prompt_token_cap(tiny_model_dir):
    strict = ChatSafeCoDe(model=str(tiny_model_dir("llava")), judge="fixed:safe", policy=InputPolicy(max_prompt_tokens=40))
    with pytest.raises(InputLimitError, match="max_prompt_tokens"):
        strict.invoke([HumanMessage("word " * 200)])
    assert strict.invoke([HumanMessage("hi")]).usage_metadata["input_tokens"] <= 40


def test_urls_and_local_paths_are_refused_by_default_without_network(chat, no_model_work):
    # pytest-socket is active: a connection attempt would raise SocketBlockedError, not our error
    url_msg = HumanMessage([{"type": "image", "url": "http://127.0.0.1:9/cat.png"}, {"type": "text", "text": "hi"}])
    with pytest.raises(ImageInputError, match="off by default"):
        chat.invoke([url_msg])
    path_msg = HumanMessage(
        [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "hi"}]
    )
    with pytest.raises(ImageInputError, match="off by default"):
        chat.invoke([path_msg])


# -- judge faults ------------------------------------------------------------------------------


def broken_judge(request):
    raise RuntimeError("judge backend down")


def slow_judge(request):
    time.sleep(1.0)
    return "safe"


@pytest.mark.parametrize(
    ("judge", "error_text"),
    [(broken_judge, "judge backend down"), (slow_judge, "time"), (lambda request: "perhaps", "perhaps")],
)
def test_judge_faults_fail_closed_and_show_in_metadata(tiny_model_dir, judge, error_text):
    chat = ChatSafeCoDe(
        model=str(tiny_model_dir("llava")),
        judge=judge,
        safecode=SafeCoDeConfig(judge_timeout_s=0.2),
        max_new_tokens=6,
    )
    answer = chat.invoke([image_message("How do I get down there?", png_b64())])
    safety = answer.response_metadata["safety"]
    assert safety["verdict"] == "unsafe" and safety["source"] == "fallback"
    assert error_text in safety["error"].lower() or error_text in safety["error"]
    assert safety["refused"]  # fail closed: the answer opens with a refusal
    again = chat.invoke([HumanMessage("hi")], verdict="safe")
    assert again.response_metadata["safety"]["source"] == "override"


def test_judge_fault_policy_safe_and_raise(tiny_model_dir):
    from safecode_guard import JudgeError

    open_chat = ChatSafeCoDe(
        model=str(tiny_model_dir("llava")), judge=broken_judge, safecode=SafeCoDeConfig(on_judge_error="safe")
    )
    assert open_chat.invoke([HumanMessage("hi")]).response_metadata["safety"]["verdict"] == "safe"
    strict = ChatSafeCoDe(
        model=str(tiny_model_dir("llava")), judge=broken_judge, safecode=SafeCoDeConfig(on_judge_error="raise")
    )
    with pytest.raises(JudgeError, match="judge backend down"):
        strict.invoke([HumanMessage("hi")])


# -- concurrency and load ------------------------------------------------------------------------


def _requests(n: int) -> list[list]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    return [
        [SystemMessage("Be brief."), image_message(f"Question {i}: what is shown?", png_b64(colors[i % 4]))]
        for i in range(n)
    ]


def test_threads_get_their_own_correct_answers(tiny_model_dir):
    chat = ChatSafeCoDe(model=str(tiny_model_dir("qwen2_vl")), judge="self", max_new_tokens=8)
    requests = _requests(8)
    sequential = [chat.invoke(r) for r in requests]
    results: dict[int, object] = {}

    def call(i: int) -> None:
        results[i] = chat.invoke(requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(sequential):
        got = results[i]
        assert got.content == expected.content
        got_safety, expected_safety = dict(got.response_metadata["safety"]), dict(expected.response_metadata["safety"])
        # concurrent self-judge passes are prefilled as one padded batch: the score may move in
        # its last float digits (batched kernels sum in another order), never more
        assert got_safety.pop("unsafe_score") == pytest.approx(expected_safety.pop("unsafe_score"), abs=1e-6)
        assert got_safety == expected_safety
    assert len({r.content for r in sequential}) > 1  # the requests really differ


async def test_asyncio_gather_matches_sequential_and_keeps_the_loop_free(tiny_model_dir):
    chat = ChatSafeCoDe(model=str(tiny_model_dir("llava")), judge="fixed:safe", max_new_tokens=8)
    requests = _requests(6)
    sequential = [chat.invoke(r) for r in requests]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    answers = await asyncio.gather(*(chat.ainvoke(r) for r in requests), chat.abatch(requests[:2]))
    tick_task.cancel()
    batch = answers[-1]
    assert [a.content for a in answers[:-1]] == [s.content for s in sequential]
    assert [b.content for b in batch] == [s.content for s in sequential[:2]]
    assert ticks > 5  # the event loop kept running while the model worked


@pytest.mark.soak
def test_two_hundred_calls_do_not_grow_memory(tiny_model_dir, capsys):
    chat = ChatSafeCoDe(model=str(tiny_model_dir("llava")), judge="self", max_new_tokens=4)
    message = [image_message("What is shown?", png_b64())]
    for _ in range(20):  # warm up allocator pools and caches
        chat.invoke(message)
    gc.collect()
    samples = []
    for i in range(200):
        chat.invoke(message)
        if i % 50 == 49:
            gc.collect()
            samples.append(rss_mb())
    with capsys.disabled():
        print(f"\nRSS after 20 warm-up calls then every 50 of 200 calls (MB): {[round(s, 1) for s in samples]}")
    # a leak of a cache or an image per call (~0.1-1 MB each) would add 20+ MB over 200 calls
    assert samples[-1] - samples[0] < 15.0
