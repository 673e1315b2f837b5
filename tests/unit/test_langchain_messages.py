"""LangChain message conversion (`lc_messages`) and the chat model's pure helpers (`safety_metadata`,
`refusal_decision`, `sampling_kwargs`), with no model.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.language_models._utils import _normalize_messages
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from PIL import Image
from support.image_bytes import b64, png_bytes
from support.messages import SAFETY_KEYS

from safecode_guard import (
    ImageInputError,
    InputPolicy,
    SafeCoDeConfig,
    SafeCoDeInputError,
    UnsupportedContentError,
    Verdict,
)
from safecode_guard import images as images_module
from safecode_guard.chat_model import refusal_decision, safety_metadata, sampling_kwargs
from safecode_guard.lc_messages import to_hf_messages
from safecode_guard.ops import opens_with_refusal
from safecode_guard.testing import gradient_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


IMAGE = gradient_image(48, 40)


def image_blocks(image: Image.Image) -> dict[str, dict[str, Any]]:
    """Every shape in which LangChain code hands us one image."""
    data = b64(image)
    return {
        "v1 base64": {"type": "image", "base64": data, "mime_type": "image/png"},
        "image_url data URL": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        "image_url bare string": {"type": "image_url", "image_url": f"data:image/png;base64,{data}"},
        "v0 source_type base64": {"type": "image", "source_type": "base64", "data": data, "mime_type": "image/png"},
        "v0 source_type url (data URL)": {"type": "image", "source_type": "url", "url": f"data:image/png;base64,{data}"},
        "v1 url (data URL)": {"type": "image", "url": f"data:image/png;base64,{data}"},
        "anthropic source": {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
        "in-memory PIL": {"type": "image", "image": image},
    }


@pytest.mark.parametrize("shape", list(image_blocks(IMAGE)))
@pytest.mark.parametrize("normalised", [False, True], ids=["raw", "normalised"])
def test_every_image_shape_becomes_the_same_pil_image(shape: str, normalised: bool) -> None:
    messages: list[BaseMessage] = [HumanMessage([image_blocks(IMAGE)[shape], {"type": "text", "text": "What is this?"}])]
    if normalised:  # what BaseChatModel does before calling us
        messages = _normalize_messages(messages)
    [hf] = to_hf_messages(messages, InputPolicy())
    assert hf["role"] == "user"
    image_part, text_part = hf["content"]
    assert text_part == {"type": "text", "text": "What is this?"}
    assert image_part["type"] == "image" and isinstance(image_part["image"], Image.Image)
    assert np.array_equal(pixels(image_part["image"]), pixels(IMAGE))


def test_roles_and_order_of_a_multi_turn_conversation() -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage([{"type": "text", "text": "Look:"}, image_blocks(IMAGE)["v1 base64"]]),
        AIMessage("A gradient."),
        HumanMessage("And now?"),
        HumanMessage("Second user turn in a row."),
        ChatMessage(role="assistant", content="ok"),
        ChatMessage(role="developer", content="sys2"),
        ChatMessage(role="user", content="last"),
    ]
    hf = to_hf_messages(messages, InputPolicy())
    assert [m["role"] for m in hf] == ["system", "user", "assistant", "user", "user", "assistant", "system", "user"]
    assert hf[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert [p["type"] for p in hf[1]["content"]] == ["text", "image"]
    assert hf[4]["content"] == [{"type": "text", "text": "Second user turn in a row."}]


def test_reasoning_in_earlier_assistant_turns_is_dropped() -> None:
    messages = [
        HumanMessage("hi"),
        AIMessage([{"type": "reasoning", "reasoning": "secret"}, {"type": "text", "text": "Hello"}]),
        AIMessage([{"type": "thinking", "thinking": "hmm", "signature": "x"}, {"type": "text", "text": "Again"}]),
        HumanMessage("bye"),
    ]
    hf = to_hf_messages(messages, InputPolicy())
    assert hf[1]["content"] == [{"type": "text", "text": "Hello"}]
    assert hf[2]["content"] == [{"type": "text", "text": "Again"}]


UNSUPPORTED: dict[str, tuple[BaseMessage, str]] = {
    "audio": (HumanMessage([{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}]), "'audio'"),
    "openai input_audio": (HumanMessage([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]), "'audio'"),
    "video": (HumanMessage([{"type": "video", "base64": "AAAA", "mime_type": "video/mp4"}]), "'video'"),
    "pdf file": (HumanMessage([{"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}]), "'file'"),
    "text-plain file": (HumanMessage([{"type": "text-plain", "text": "x", "mime_type": "text/plain"}]), "'text-plain'"),
    "image file_id": (HumanMessage([{"type": "image", "file_id": "file-123"}]), "file id 'file-123'"),
    "v0 image id": (HumanMessage([{"type": "image", "source_type": "id", "id": "file-9"}]), "file id 'file-9'"),
    "unknown block": (HumanMessage([{"type": "hologram", "data": 1}]), "'hologram'"),
    "image in a tool result": (ToolMessage([image_blocks(IMAGE)["v1 base64"]], tool_call_id="1"), "tool result"),
    "function message": (FunctionMessage("42", name="f"), "FunctionMessage"),
    "tool call in a user turn": (HumanMessage([{"type": "tool_call", "name": "f", "args": {}, "id": "1"}]), "'tool_call'"),
    "server tool call": (AIMessage([{"type": "server_tool_call", "name": "web_search", "args": {}, "id": "1"}]), "'server_tool_call'"),
    "image in an assistant turn": (AIMessage([image_blocks(IMAGE)["v1 base64"]]), "only user"),
    "image in a system turn": (SystemMessage([image_blocks(IMAGE)["v1 base64"]]), "only user"),
    "unknown chat role": (ChatMessage(role="narrator", content="x"), "'narrator'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_content_is_rejected_naming_the_block_and_the_fix(case: str) -> None:
    message, named = UNSUPPORTED[case]
    with pytest.raises(UnsupportedContentError) as err:
        to_hf_messages([HumanMessage("first"), message], InputPolicy())
    text = str(err.value)
    assert "messages[1]" in text and named in text
    # every message says what to do instead
    assert any(w in text for w in ("Use", "Send", "Remove", "Move", "call it", "leave tools out", "Give"))


def test_url_images_are_fetched_only_when_the_policy_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []
    real_fetch = images_module.fetch_image_bytes

    def served(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, content=png_bytes(IMAGE))

    def offline_fetch(url: str, policy: InputPolicy) -> bytes:
        # the real fetch (policy check included), with a mock network and a public address
        return real_fetch(url, policy, transport=httpx.MockTransport(served), resolve=lambda host, port: ["93.184.215.14"])

    monkeypatch.setattr(images_module, "fetch_image_bytes", offline_fetch)
    message = HumanMessage([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}])
    with pytest.raises(ImageInputError, match="allow_image_urls"):
        to_hf_messages([message], InputPolicy())
    assert fetched == []
    [hf] = to_hf_messages([message], InputPolicy(allow_image_urls=True))
    assert len(fetched) == 1 and fetched[0].endswith("/cat.png")
    assert np.array_equal(pixels(hf["content"][0]["image"]), pixels(IMAGE))


def test_corrupt_and_oversized_images_are_typed_errors() -> None:
    truncated = base64.b64encode(png_bytes(IMAGE)[:40]).decode()
    with pytest.raises(ImageInputError):
        to_hf_messages([HumanMessage([{"type": "image", "base64": truncated, "mime_type": "image/png"}])], InputPolicy())
    with pytest.raises(ImageInputError):
        to_hf_messages([HumanMessage([image_blocks(IMAGE)["v1 base64"]])], InputPolicy(max_image_pixels=100))


def test_safety_metadata_has_exactly_the_spec_keys() -> None:
    verdict = Verdict(label="unsafe", unsafe_score=0.8, caption="a cliff", judge="self:caption", latency_s=0.2)
    config = SafeCoDeConfig(threshold=0.4, steered_steps=7, unsafe_mode="boost")
    meta = safety_metadata(verdict, config, refused=True)
    assert set(meta) == SAFETY_KEYS
    assert meta == {
        "verdict": "unsafe", "unsafe_score": 0.8, "threshold": 0.4, "judge": "self:caption", "source": "judge",
        "caption": "a cliff", "error": None, "steered_steps": 7, "unsafe_mode": "boost", "refused": True, "transcript_truncated": False,
        "categories": [],
    }


PHRASES = ("I'm sorry", "I cannot", "Sorry", "As an AI")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None), ("   ", None), ("I", None), (" I", None), ("I'", None), ("I\u2019m sor", None), ("i CAN", None),
        ("I'm sorry", True), ("  sorry, no", True), ("As an AI model", True),
        ("It", False), ("I think", False), ("Sure", False), ("As a", None), ("As an Ai", True), ("Asa", False),
    ],
)
def test_refusal_decision_examples(text: str, expected: bool | None) -> None:
    assert refusal_decision(text, PHRASES) is expected


_ALPHABET = st.sampled_from(list("I'm sorycantAS \u2019xzN"))


@settings(max_examples=300, deadline=None)
@given(text=st.text(_ALPHABET, max_size=14), cut=st.integers(0, 14))
def test_refusal_decision_never_contradicts_the_whole_answer(text: str, cut: int) -> None:
    decided = refusal_decision(text[:cut], PHRASES)
    if decided is not None:
        assert decided == opens_with_refusal(text, PHRASES)
    assert refusal_decision(text, PHRASES) in (None, opens_with_refusal(text, PHRASES))


def test_sampling_kwargs_follow_langchain_conventions() -> None:
    assert sampling_kwargs(None, None, None, None)["do_sample"] is False
    assert sampling_kwargs(0, 0.9, 5, None) == {"do_sample": False, "temperature": None, "top_p": 0.9, "top_k": 5}
    assert sampling_kwargs(0.7, None, None, None) == {"do_sample": True, "temperature": 0.7, "top_p": None, "top_k": None}
    assert sampling_kwargs(0.7, None, None, False)["do_sample"] is False
    assert sampling_kwargs(None, None, None, True)["do_sample"] is True
    with pytest.raises(SafeCoDeInputError, match="temperature"):
        sampling_kwargs(0, None, None, True)
