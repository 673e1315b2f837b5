"""Property-based tests of every input reader: whatever comes in, only typed errors or valid results come out."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from safecode_guard import InputPolicy, SafeCoDeConfig, SafeCoDeInputError
from safecode_guard.prompting import Conversation, parse_messages


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20)
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=30), junk)})
image_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["image", "image_url"]), "image": st.one_of(st.just(_png()), st.binary(max_size=30), junk)}
)
odd_part = st.dictionaries(st.sampled_from(["type", "text", "image", "url", "x"]), junk, max_size=3)
part = st.one_of(text_part, image_part, odd_part, st.text(max_size=10), junk)
content = st.one_of(st.text(max_size=40), st.lists(part, max_size=4), junk)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", "x"]), "content": content}),
    st.dictionaries(st.text(max_size=5), junk, max_size=3),
    junk,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(message, max_size=5), junk))
def test_parse_messages_gives_a_conversation_or_a_typed_error(messages):
    try:
        conv = parse_messages(messages, InputPolicy(max_images=2))
    except SafeCoDeInputError as exc:
        assert str(exc)  # every error says something
        return
    assert isinstance(conv, Conversation)
    assert conv.messages and conv.messages[-1]["role"] != "assistant"
    assert len(conv.images) <= 2
    assert all(img.mode == "RGB" and img.width > 0 for img in conv.images)
    for m in conv.messages:
        assert m["role"] in ("system", "user", "assistant", "tool")
        assert all(p["type"] in ("text", "image") for p in m["content"])


settings_values = st.one_of(junk, st.floats(-1e9, 1e9), st.integers(-10, 10_000), st.lists(st.text(max_size=5), max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*SafeCoDeConfig.model_fields, "bogus"]), settings_values, max_size=4))
def test_config_gives_a_valid_config_or_a_validation_error(kwargs):
    try:
        cfg = SafeCoDeConfig(**kwargs)
    except ValidationError as exc:
        assert isinstance(exc, ValueError) and exc.errors()
        return
    assert 0 <= cfg.alpha <= 10 and 0 <= cfg.steered_steps <= 256 and 0 <= cfg.threshold <= 1
    assert cfg.refusal_phrases and all(p.strip() for p in cfg.refusal_phrases)
    assert cfg.plausibility_beta is None or 0 < cfg.plausibility_beta <= 1


# -- LangChain message conversion --------------------------------------------------------------

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage  # noqa: E402

from safecode_guard.lc_messages import to_hf_messages  # noqa: E402

lc_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries(
        {"type": st.just("image"), "base64": st.one_of(st.just(__import__("base64").b64encode(_png()).decode()), st.text(max_size=12)),
         "mime_type": st.sampled_from(["image/png", "image/jpeg", "text/plain"])}
    ),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text(max_size=30)})}),
    st.fixed_dictionaries({"type": st.sampled_from(["audio", "file", "video", "weird"]), "data": st.text(max_size=5)}),
)
lc_content = st.one_of(st.text(max_size=30), st.lists(st.one_of(lc_block, st.text(max_size=8)), max_size=3))


@st.composite
def lc_message(draw):
    kind = draw(st.sampled_from(["human", "ai", "system", "tool"]))
    content = draw(lc_content)
    if kind == "tool":
        return ToolMessage(content=content if isinstance(content, str) else "x", tool_call_id="1")
    return {"human": HumanMessage, "ai": AIMessage, "system": SystemMessage}[kind](content=content)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(lc_message(), max_size=4))
def test_langchain_conversion_gives_messages_or_a_typed_error(messages):
    try:
        converted = to_hf_messages(messages, InputPolicy())
        conv = parse_messages(converted, InputPolicy())
    except SafeCoDeInputError as exc:
        assert str(exc)
        return
    assert conv.messages and all(img.mode == "RGB" for img in conv.images)


# -- Image structure walks --------------------------------------------------------------------------

from safecode_guard.images import structure_problem  # noqa: E402

_SIGNED = [
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",
    b"BM",
]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_SIGNED), st.binary(max_size=300))
def test_structure_walks_never_raise_and_always_end(signature, tail):
    """Any bytes behind a known signature: a reason (str) or None, never an exception or a hang."""
    problem = structure_problem(signature + tail)
    assert problem is None or (isinstance(problem, str) and problem)
