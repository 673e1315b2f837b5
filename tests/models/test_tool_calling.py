"""Tool calling and structured output of `ChatSafeCoDe` on tiny models.

Tier 1: the pure functions of `safecode_guard.tools` (schemas, `tool_choice`,
the splitter and call parser, the template probe) and the message
conversion of tool turns.
Tier 2: `ChatSafeCoDe` on tiny Qwen2.5-VL and Llava models whose processors
carry real tool-capable templates (Qwen2.5 `<tool_call>` tags and Llama 3.1
plain JSON, `safecode_guard.testing`). Random weights emit noise, so the
answers are scripted through `ScriptedDecoding`, a double of the token
choice only: rendering, prefill, the verdict, refusal prefixes, parsing and
LangChain's plumbing all run for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.exceptions import ModelRefusalError, OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from support.tools import ScriptedDecoding

from safecode_guard import (
    ChatSafeCoDe,
    InputPolicy,
    SafeCoDeConfig,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from safecode_guard.lc_messages import to_hf_messages
from safecode_guard.ops import opens_with_refusal
from safecode_guard.prompting import parse_messages, render_prompt
from safecode_guard.testing import (
    TOOL_FAMILIES,
    call_text,
    gradient_image,
    hermes_template,
    llama_json_template,
)
from safecode_guard.tools import (
    RawCall,
    ToolCallSplitter,
    ToolTemplate,
    forced_prefix,
    format_tools,
    normalize_tool_choice,
    parse_answer,
    probe_tool_template,
)

FAMILIES = list(TOOL_FAMILIES)


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person seen in the picture."""

    name: str = Field(description="first name")
    age: int


NAMES = ["get_weather", "add"]


def ids() -> Callable[[], str]:
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


# =========================================================================== tier 1: schemas, choice


def test_format_tools_accepts_every_langchain_tool_shape() -> None:
    def multiply(x: int, y: int) -> int:
        """Multiply two integers."""
        return x * y

    openai_dict = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}
    json_schema = {"title": "lookup", "description": "Look up a word.", "type": "object", "properties": {"word": {"type": "string"}}}
    formatted = format_tools([get_weather, Person, multiply, openai_dict, json_schema])
    assert [t["function"]["name"] for t in formatted] == ["get_weather", "Person", "multiply", "f", "lookup"]
    assert all(t["type"] == "function" for t in formatted)
    assert formatted[0]["function"]["parameters"]["properties"] == {"city": {"type": "string"}}
    assert formatted[1]["function"]["description"] == "A person seen in the picture."


@pytest.mark.parametrize(
    ("tools", "named"),
    [
        (get_weather, "must be a list"),
        ([{"type": "web_search_preview"}], "'web_search_preview' tool"),
        ([{"type": "function"}], "no function schema"),
        ([{"type": "function", "function": {"name": 'bad"name', "parameters": {}}}], "'bad\"name'"),
        ([42], "tools[0] (int)"),
    ],
)
def test_bad_tools_are_typed_errors_naming_the_fix(tools: Any, named: str) -> None:
    with pytest.raises(UnsupportedContentError) as err:
        format_tools(tools)
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, "auto"), ("auto", "auto"), ("none", "none"), (False, "none"),
        ("any", "any"), ("required", "any"), (True, "any"), ({"type": "any"}, "any"),
        ("add", "add"), ({"type": "function", "function": {"name": "add"}}, "add"),
        ({"type": "tool", "name": "get_weather"}, "get_weather"),
    ],
)
def test_tool_choice_spellings(choice: Any, expected: str) -> None:
    assert normalize_tool_choice(choice, NAMES) == expected


def test_tool_choice_of_an_unbound_tool_is_refused() -> None:
    with pytest.raises(SafeCoDeInputError, match="bound tool"):
        normalize_tool_choice("delete_files", NAMES)


def test_forced_prefix_opens_a_call_in_the_templates_own_layout() -> None:
    qwen = ToolTemplate('<tool_call>\n{"name": "', '", "arguments": ')
    assert forced_prefix(qwen, "auto", NAMES) == "" and forced_prefix(qwen, "none", NAMES) == ""
    assert forced_prefix(qwen, "any", NAMES) == '<tool_call>\n{"name": "'
    assert forced_prefix(qwen, "any", ["add"]) == '<tool_call>\n{"name": "add", "arguments": '
    assert forced_prefix(qwen, "get_weather", NAMES) == '<tool_call>\n{"name": "get_weather", "arguments": '
    with pytest.raises(UnsupportedModelError, match="tool_choice='auto'"):
        forced_prefix(ToolTemplate(None, None), "add", NAMES)


# =========================================================================== tier 1: parsing

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "content", "calls", "invalid"),
    [
        ("Just text.", "Just text.", [], []),
        (HERMES_CALL, "", [("get_weather", {"city": "Paris"})], []),
        ("Let me check.\n" + HERMES_CALL + "\nOne moment.", "Let me check.\nOne moment.", [("get_weather", {"city": "Paris"})], []),
        (HERMES_CALL + HERMES_CALL.replace("Paris", "Rome"), "", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})], []),
        ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', "", [("add", {"a": 1, "b": 2})], []),
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", {"a": 1, "b": 2})], []),
        ('[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]', "",
         [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})], []),
        ('{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}', "", [("add", {"a": 1}), ("add", {"a": 2})], []),
        ('{"name": "get_weather"}', "", [("get_weather", {})], []),
        # ordinary JSON answers and text that only looks like a tag stay text
        ('{"answer": 42}', '{"answer": 42}', [], []),
        ('[1, 2, 3]', '[1, 2, 3]', [], []),
        ("a < b and <tool_ca", "a < b and <tool_ca", [], []),
        # malformed calls are invalid calls, never exceptions and never guesses
        ('<tool_call>{"name": "add", "arguments": {"a": </tool_call>', "", [], [("add", "not valid JSON")]),
        ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "", [], [("rm_rf", "not one of the bound tools")]),
        ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "", [], [("add", "must be a JSON object")]),
        ('<tool_call>["add"]</tool_call>', "", [], [(None, 'string "name"')]),
        ('{"name": "add", "parameters": {"a": 1', "", [], [("add", "not valid JSON")]),
        # cut off mid-call: invalid, even though a lenient parser could "repair" it
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1', "", [], [("add", "never closed")]),
        # the closing tag cut off after complete JSON: the call is whole
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool', "", [("add", {"a": 1})], []),
        ('<tool_call>{"name": "add", "arguments": {"a": 1}}<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>',
         "", [("add", {"a": 1}), ("add", {"a": 2})], []),
    ],
)
def test_parse_answer(text: str, content: str, calls: list[tuple[str, dict]], invalid: list[tuple[str | None, str]]) -> None:
    parsed = parse_answer(text, NAMES, ids())
    assert parsed.content == content
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == calls
    assert [c["name"] for c in parsed.invalid_tool_calls] == [name for name, _ in invalid]
    for call, (_, reason) in zip(parsed.invalid_tool_calls, invalid, strict=True):
        assert reason in call["error"] and call["args"]  # the raw text is kept for the application
    assert len({c["id"] for c in [*parsed.tool_calls, *parsed.invalid_tool_calls]}) == len(calls) + len(invalid)


answers = st.lists(
    st.one_of(
        st.sampled_from(["Sure. ", "\n", " ", "<tool", "_call>", HERMES_CALL, '{"name": "add", "arguments": {"a": 1}}',
                         "</tool_call>", "<tool_call>", '{"', "text", "[", "]", "{", "}", ";"]),
        st.text(max_size=8),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(answers, st.lists(st.integers(0, 200), max_size=6))
def test_splitting_an_answer_into_pieces_never_changes_what_is_read(text: str, cuts: list[int]) -> None:
    """The splitter streams: wherever the pieces are cut, the same text and calls come out."""
    whole = ToolCallSplitter()
    expected = [*whole.feed(text), *whole.finish()]
    pieces, at = [], 0
    for cut in sorted(c for c in cuts if c <= len(text)):
        pieces.append(text[at:cut])
        at = cut
    pieces.append(text[at:])
    split = ToolCallSplitter()
    events = [e for p in pieces for e in split.feed(p)] + split.finish()
    assert "".join(e for e in events if isinstance(e, str)) == "".join(e for e in expected if isinstance(e, str))
    assert [e for e in events if isinstance(e, RawCall)] == [e for e in expected if isinstance(e, RawCall)]
    parse_answer(text, NAMES)  # and reading it never raises


# =========================================================================== tier 1: templates and messages


def render_with(template: str) -> Callable[..., str]:
    from transformers import PreTrainedTokenizerFast

    from safecode_guard.testing import make_tokenizer

    tok: PreTrainedTokenizerFast = make_tokenizer(chat_template=template)
    return lambda messages, tools, gen: render_prompt(tok, messages, tools=tools, add_generation_prompt=gen)


def test_probe_reads_the_call_layout_of_both_tool_templates() -> None:
    assert probe_tool_template(render_with(hermes_template("<image>"))) == ToolTemplate('<tool_call>\n{"name": "', '", "arguments": ')
    assert probe_tool_template(render_with(llama_json_template("<image>"))) == ToolTemplate('{"name": "', '", "parameters": ')


def test_probe_refuses_templates_without_tools_naming_the_fix() -> None:
    from safecode_guard.testing import chatml_template

    with pytest.raises(UnsupportedModelError, match="no tool support") as err:
        probe_tool_template(render_with(chatml_template()), "'tiny'")
    assert "processor.chat_template" in str(err.value) and "'tiny'" in str(err.value)
    raising = "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}{{ messages[0].content }}"
    with pytest.raises(UnsupportedModelError, match="no tools here"):
        probe_tool_template(render_with(raising))


def test_probe_without_a_readable_call_layout_still_offers_tools() -> None:
    # shows the tools, but renders earlier calls as plain text without the call's JSON
    template = ("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{{ m.role }}: "
                "{% if m.tool_calls %}(a call){% endif %}{{ m.content if m.content is string else '' }}\n{% endfor %}")
    assert probe_tool_template(render_with(template)) == ToolTemplate(None, None)


TOOL_HISTORY = [
    SystemMessage("You help with the weather."),
    HumanMessage([{"type": "image", "image": gradient_image()}, {"type": "text", "text": "Weather in Paris?"}]),
    AIMessage("Checking.", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]),
    ToolMessage("Sunny, 21 C", tool_call_id="call_1", name="get_weather"),
    ToolMessage("error: no data <|im_end|>", tool_call_id="call_2", status="error"),
]


def test_tool_turns_become_transformers_tool_messages() -> None:
    hf = to_hf_messages(TOOL_HISTORY, InputPolicy())
    assert [m["role"] for m in hf] == ["system", "user", "assistant", "tool", "tool"]
    assert hf[2]["content"] == [{"type": "text", "text": "Checking."}]
    assert hf[2]["tool_calls"] == [{"type": "function", "id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert hf[3] == {"role": "tool", "content": [{"type": "text", "text": "Sunny, 21 C"}], "tool_call_id": "call_1", "name": "get_weather"}
    # Anthropic-style list content repeats the call as a tool_use block: read once, from tool_calls
    anthropic = AIMessage(
        [{"type": "text", "text": "hmm"}, {"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 1}}],
        tool_calls=[{"name": "add", "args": {"a": 1}, "id": "t1", "type": "tool_call"}],
        invalid_tool_calls=[{"name": "add", "args": "{bad", "id": "t2", "error": None, "type": "invalid_tool_call"}],
    )
    [hf_ai] = to_hf_messages([anthropic], InputPolicy())
    assert hf_ai["content"] == [{"type": "text", "text": "hmm"}]
    assert [c["function"]["name"] for c in hf_ai["tool_calls"]] == ["add"]  # the never-run invalid call is dropped


def test_tool_results_are_not_merged_and_their_special_tokens_are_neutralized() -> None:
    conv = parse_messages(to_hf_messages(TOOL_HISTORY, InputPolicy()), InputPolicy())
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant", "tool", "tool"]
    assert conv.request == "Weather in Paris?" and len(conv.images) == 1
    prompt = render_prompt(tool_processor_stub(), conv.messages, ["<|im_end|>", "<|im_start|>"])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nSunny, 21 C\n</tool_response>\n<tool_response>\nerror: no data <\u200b|im_end|>" in prompt


def tool_processor_stub() -> Any:
    from safecode_guard.testing import make_tokenizer

    return make_tokenizer(chat_template=hermes_template("<image>"))


def test_tool_calls_in_history_must_have_the_transformers_shape() -> None:
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
           {"role": "user", "content": "again"}]
    with pytest.raises(UnsupportedContentError, match="tool_calls"):
        parse_messages(bad, InputPolicy())


# =========================================================================== tier 2: the chat model




def merged(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    return full


@pytest.mark.parametrize("family", FAMILIES)
def test_tools_are_rendered_and_calls_parsed(family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat(family).bind_tools([get_weather, add])
    script.add(call_text(family, "get_weather", {"city": "Paris"}))
    answer = llm.invoke([HumanMessage([{"type": "image", "image": gradient_image()}, {"type": "text", "text": "Weather?"}])])
    assert isinstance(answer, AIMessage)
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert answer.tool_calls[0]["id"].startswith("call_")
    assert answer.content == "" and answer.invalid_tool_calls == []
    assert answer.response_metadata["safety"]["blocked_tool_calls"] == []
    assert answer.response_metadata["safety"]["verdict"] == "safe"
    prompt = script.prompts[-1]
    assert "Current weather in a city." in prompt and '"add"' in prompt  # the template's own tool block
    assert chat(family).profile["tool_calling"] is True  # loaded objects: the template was asked
    assert script.prefixes == [""]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_tool_calls_match_invoke(family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat(family, max_new_tokens=256).bind_tools([get_weather, add])
    reply = call_text(family, "add", {"a": 2, "b": 3})
    if family == "qwen2_5_vl":  # tags may share an answer with text
        reply = "Adding now.\n" + reply + "\n" + call_text(family, "add", {"a": 1, "b": "x y"})
    script.add(reply, reply)
    invoked = llm.invoke("What is 2 + 3?")
    chunks = list(llm.stream("What is 2 + 3?"))
    full = merged(chunks)
    assert full.content == invoked.content
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert len(full.tool_calls) == (2 if family == "qwen2_5_vl" else 1)
    assert sum(1 for c in chunks if "safety" in c.response_metadata and "verdict" in c.response_metadata["safety"]) == 1
    assert full.response_metadata["safety"] == invoked.response_metadata["safety"]
    with_calls = [i for i, c in enumerate(chunks) if c.tool_call_chunks]
    assert with_calls and chunks[with_calls[0]].tool_call_chunks[0]["index"] == 0
    assert chunks[-1].chunk_position == "last"


async def test_astream_and_ainvoke_read_calls_too(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat("qwen2_5_vl").bind_tools([get_weather])
    reply = call_text("qwen2_5_vl", "get_weather", {"city": "Köln"})
    script.add(reply, reply)
    answer = await llm.ainvoke("Weather in Köln?")
    full = merged([c async for c in llm.astream("Weather in Köln?")])
    assert answer.tool_calls[0]["args"] == full.tool_calls[0]["args"] == {"city": "Köln"}


MALFORMED_REPLIES = {
    # cut off mid-call: LangChain's chunk merging would "repair" {"a": 1 into a runnable call
    "truncated": ('Sure <tool_call>\n{"name": "add", "arguments": {"a": 1', "Sure", "add", "never closed"),
    "truncated name": ('<tool_call>{"name": "A', "", None, "never closed"),
    "unknown tool": ('<tool_call>{"name": "format_disk", "arguments": {}}</tool_call>', "", "format_disk", "not one of the bound tools"),
    "bad json": ('<tool_call>{"name": "add", "arguments": {"a": </tool_call>', "", "add", "not valid JSON"),
    "arguments not an object": ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "", "add", "must be a JSON object"),
    "no name": ('<tool_call>["add"]</tool_call>', "", None, 'string "name"'),
    "bad arguments string": ('<tool_call>{"name": "add", "arguments": "{oops"}</tool_call>', "", "add", "arguments string"),
    "deep arguments": ('<tool_call>{"name": "add", "arguments": ' + "[" * 100 + "]" * 100 + "}</tool_call>", "", "add", "nested more than"),
    "plain json cut off": ('{"name": "add", "parameters": {"a": 1', "", "add", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED_REPLIES))
def test_malformed_calls_read_the_same_through_invoke_and_stream(
    case: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    reply, content, name, reason = MALFORMED_REPLIES[case]
    llm = chat("qwen2_5_vl", max_new_tokens=300).bind_tools([add])
    script.add(reply, reply)
    answer = llm.invoke("1 + ?")
    full = merged(list(llm.stream("1 + ?")))
    [raw] = parse_answer(reply, ["add"]).invalid_tool_calls  # what the model wrote, read directly
    for message in (answer, full):
        assert message.tool_calls == []
        [call] = message.invalid_tool_calls
        assert call["name"] == name and message.content == content
        # the raw text travels as a JSON string, which no chunk merge can turn into arguments
        assert json.loads(call["args"]) == raw["args"]
        assert reason in message.response_metadata["invalid_tool_call_errors"][call["id"]]
    # one reading of the answer: invoke is the merge of the stream's chunks
    assert answer.invalid_tool_calls[0] | {"id": None} == full.invalid_tool_calls[0] | {"id": None}
    assert list(answer.response_metadata["invalid_tool_call_errors"].values()) == list(
        full.response_metadata["invalid_tool_call_errors"].values())
    assert answer.response_metadata["safety"] == full.response_metadata["safety"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_choice_opens_the_call_in_the_templates_layout(family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat(family)
    named = llm.bind_tools([get_weather, add], tool_choice="add")
    script.add('{"a": 4, "b": 5}}' + ("\n</tool_call>" if family == "qwen2_5_vl" else ""))
    answer = named.invoke("Four plus five?")
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("add", {"a": 4, "b": 5})]
    opening = '<tool_call>\n{"name": "' if family == "qwen2_5_vl" else '{"name": "'
    assert script.prefixes[-1] == opening + 'add", ' + ('"arguments": ' if family == "qwen2_5_vl" else '"parameters": ')
    script.add('get_weather", "' + ("arguments" if family == "qwen2_5_vl" else "parameters") + '": {"city": "Rome"}}')
    forced_any = llm.bind_tools([get_weather, add], tool_choice="any").invoke("Weather in Rome?")
    assert script.prefixes[-1] == opening
    assert [c["name"] for c in forced_any.tool_calls] == ["get_weather"]


def test_tool_choice_none_offers_no_tools_and_reads_no_calls(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    script.add(HERMES_CALL)
    answer = chat("qwen2_5_vl").bind_tools([get_weather], tool_choice="none").invoke("Weather?")
    assert "Current weather in a city." not in script.prompts[-1]
    assert answer.tool_calls == [] and answer.content == HERMES_CALL


def test_parallel_tool_calls_false_keeps_the_first_call(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    script.add(call_text("qwen2_5_vl", "add", {"a": 1, "b": 1}) + call_text("qwen2_5_vl", "add", {"a": 2, "b": 2}))
    llm = chat("qwen2_5_vl", max_new_tokens=256).bind_tools([add], parallel_tool_calls=False)
    script.add(script.replies[0])
    answer, full = llm.invoke("sums"), merged(list(llm.stream("sums")))
    for message in (answer, full):
        assert [c["args"] for c in message.tool_calls] == [{"a": 1, "b": 1}]
        [dropped] = message.invalid_tool_calls  # stays invalid after the chunk merge too
        assert json.loads(dropped["args"]) == '{"a": 2, "b": 2}'
        assert "only the first" in message.response_metadata["invalid_tool_call_errors"][dropped["id"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_results_go_back_through_the_template(family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    script.add("It is sunny in Paris.")
    answer = chat(family).bind_tools([get_weather]).invoke(TOOL_HISTORY[:4])
    assert answer.content == "It is sunny in Paris." and answer.tool_calls == []
    prompt = script.prompts[-1]
    if family == "qwen2_5_vl":
        assert "<tool_response>\nSunny, 21 C\n</tool_response>" in prompt
        assert '"name": "get_weather", "arguments": {"city": "Paris"}' in prompt
    else:
        assert "<|start_header_id|>ipython<|end_header_id|>\n\nSunny, 21 C<|eot_id|>" in prompt
        assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in prompt


def test_without_tools_bound_an_answer_is_just_text(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    script.add(HERMES_CALL)
    answer = chat("qwen2_5_vl").invoke("Weather?")
    assert answer.content == HERMES_CALL and answer.tool_calls == []
    assert "blocked_tool_calls" not in answer.response_metadata["safety"]


def test_a_template_without_tools_is_a_clear_error(load_tiny_vlm: Callable[[str], tuple[Any, Any]]) -> None:
    model, processor = load_tiny_vlm("llava")  # its own ChatML template: no tools
    llm = ChatSafeCoDe.from_model(model, processor, judge="fixed:safe", max_new_tokens=4)
    with pytest.raises(UnsupportedModelError, match="no tool support"):
        llm.bind_tools([get_weather])  # loaded already: refused at bind time
    assert llm.profile is not None and llm.profile["tool_calling"] is False
    lazy = ChatSafeCoDe(model="never/loaded")
    assert lazy.bind_tools([get_weather]) is not None  # by path: checked on first use, not in bind_tools
    with pytest.raises(UnsupportedModelError, match="no tool support"):
        llm.invoke(TOOL_HISTORY[:4])  # tool turns in history need tool support too
    assert llm.invoke("hi").content is not None  # and the model stays usable


# =========================================================================== tier 2: the safety property

UNSAFE_REPLIES = {
    "a call": call_text("qwen2_5_vl", "get_weather", {"city": "Paris"}),
    "two calls after text": "Sure!\n" + call_text("qwen2_5_vl", "add", {"a": 1, "b": 2}) * 2,
    "a bad call": '<tool_call>{"name": "add", "arguments": {"a": </tool_call>',
    "plain json": '{"name": "add", "parameters": {"a": 1, "b": 2}}',
}


@pytest.mark.parametrize("reply", list(UNSAFE_REPLIES))
@pytest.mark.parametrize("unsafe_mode", ["prefix", "boost"])
def test_an_unsafe_verdict_answer_carries_no_tool_calls(
    reply: str, unsafe_mode: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    llm = chat("qwen2_5_vl", judge="fixed:unsafe", safecode=SafeCoDeConfig(unsafe_mode=unsafe_mode))
    bound = llm.bind_tools([get_weather, add])
    text = UNSAFE_REPLIES[reply]
    script.add(text, text)
    answer = bound.invoke("Do it.")
    full = merged(list(bound.stream("Do it.")))
    for message in (answer, full):
        safety = message.response_metadata["safety"]
        assert safety["verdict"] == "unsafe"
        assert message.tool_calls == [] and message.invalid_tool_calls == []
        assert not getattr(message, "tool_call_chunks", [])  # no chunk of the stream carried a call
        assert "<tool_call>" not in str(message.content)
    # what the model tried is visible to the application
    expected = parse_answer(text, NAMES)
    tried = len(expected.tool_calls) + len(expected.invalid_tool_calls)
    if unsafe_mode == "prefix" and reply == "plain json":
        tried = 0  # the forced refusal opening comes first, so the JSON is text, not a call
    for message in (answer, full):
        assert len(message.response_metadata["safety"]["blocked_tool_calls"]) == tried
    if tried:
        assert answer.response_metadata["safety"]["blocked_tool_calls"][0]["name"] == (
            expected.tool_calls + expected.invalid_tool_calls)[0]["name"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("choice", ["get_weather", "any"])
def test_an_unsafe_verdict_turns_a_forced_tool_choice_into_a_plain_refusal(
    family: str, choice: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    llm = chat(family).bind_tools([get_weather], tool_choice=choice)
    script.add(" I can't do that.", " I can't do that.")
    answer = llm.invoke("go", verdict="unsafe")
    full = merged(list(llm.stream("go", verdict="unsafe")))
    for message in (answer, full):
        assert message.tool_calls == [] and message.invalid_tool_calls == []
        assert opens_with_refusal(message.content, SafeCoDeConfig().refusal_phrases), message.content
        assert "{" not in message.content and "tool_call" not in message.content
        safety = message.response_metadata["safety"]
        assert (safety["verdict"], safety["source"], safety["refused"], safety["blocked_tool_calls"]) == (
            "unsafe", "override", True, [])
    # the verdict was known before decoding: no forced opening, no tools offered
    assert script.prefixes == ["", ""]
    assert "Current weather in a city." not in script.prompts[-1]


def test_an_unsafe_verdict_still_blocks_calls_the_model_makes_on_its_own(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    llm = chat("qwen2_5_vl", judge="fixed:unsafe", safecode=SafeCoDeConfig(unsafe_mode="boost"))
    script.add(call_text("qwen2_5_vl", "get_weather", {"city": "Paris"}))
    answer = llm.bind_tools([get_weather]).invoke("go")  # tool_choice auto: the tools stay offered
    assert answer.tool_calls == [] and answer.response_metadata["safety"]["blocked_tool_calls"][0]["name"] == "get_weather"


# =========================================================================== tier 2: structured output


@pytest.mark.parametrize("family", FAMILIES)
def test_structured_output_through_a_forced_tool_call(family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat(family)
    close = "\n</tool_call>" if family == "qwen2_5_vl" else ""
    script.add('{"name": "Ann", "age": 31}}' + close, '{"name": "Ann", "age": 31}}' + close)
    assert llm.with_structured_output(Person).invoke("Who is this?") == Person(name="Ann", age=31)
    assert script.prefixes[-1].endswith('Person", ' + ('"arguments": ' if family == "qwen2_5_vl" else '"parameters": '))
    as_dict = llm.with_structured_output(Person.model_json_schema()).invoke("Who is this?")
    assert as_dict == {"name": "Ann", "age": 31}


def test_structured_output_errors_the_langchain_way(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat("qwen2_5_vl")
    structured = llm.with_structured_output(Person)
    script.add('{"name": "Ann", "age": "old"}}\n</tool_call>', '{"name": "Ann", "age": }}', '{"name": "Ann", "age": "old"}}\n</tool_call>')
    with pytest.raises(OutputParserException, match="do not fit the schema"):
        structured.invoke("Who?")
    with pytest.raises(OutputParserException, match="could not be read"):
        structured.invoke("Who?")
    raw = llm.with_structured_output(Person, include_raw=True).invoke("Who?")
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert isinstance(raw["raw"], AIMessage) and raw["raw"].tool_calls[0]["args"] == {"name": "Ann", "age": "old"}


def test_structured_output_under_an_unsafe_verdict_is_a_refusal(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat("qwen2_5_vl", judge="fixed:unsafe")
    script.add('{"name": "Ann", "age": 31}}\n</tool_call>', '{"name": "Ann", "age": 31}}\n</tool_call>')
    with pytest.raises(ModelRefusalError, match="unsafe") as err:
        llm.with_structured_output(Person).invoke("Who?")
    assert err.value.raw_message is not None
    raw = llm.with_structured_output(Person, include_raw=True).invoke("Who?")
    assert isinstance(raw["parsing_error"], ModelRefusalError)
    # the forced call gave way to a plain refusal: nothing to block, the refusal is the content
    assert raw["raw"].response_metadata["safety"]["blocked_tool_calls"] == []
    assert opens_with_refusal(raw["raw"].content, SafeCoDeConfig().refusal_phrases)
    for method in ("json_schema", "json_mode"):  # JSON mode: no "{" opening, no JSON instruction
        script.add("x", "x")
        raw = llm.with_structured_output(Person, method=method, include_raw=True).invoke("Who?")
        assert isinstance(raw["parsing_error"], ModelRefusalError)
        assert not raw["raw"].content.startswith("{") and script.prefixes[-1] == ""
        assert "single JSON object" not in script.prompts[-1]


def test_json_schema_mode_works_on_templates_without_tools(load_tiny_vlm: Callable[[str], tuple[Any, Any]], script: ScriptedDecoding) -> None:
    model, processor = load_tiny_vlm("llava")  # plain ChatML, no tool support
    llm = ChatSafeCoDe.from_model(model, processor, judge="fixed:safe", max_new_tokens=64)
    script.add('"name": "Bo", "age": 4}', '"name": "Bo"}', '"x": 1}')
    assert llm.with_structured_output(Person, method="json_schema").invoke("Who?") == Person(name="Bo", age=4)
    assert script.prefixes[-1] == "{"
    assert '"required": ["name", "age"]' in script.prompts[-1] and "single JSON object" in script.prompts[-1]
    with pytest.raises(OutputParserException):
        llm.with_structured_output(Person, method="json_schema").invoke("Who?")
    assert llm.with_structured_output(None, method="json_mode").invoke("Anything") == {"x": 1}  # type: ignore[arg-type]
    assert "It must match" not in script.prompts[-1]


def test_bad_structured_output_and_json_mode_arguments(chat: Callable[..., ChatSafeCoDe]) -> None:
    llm = chat("qwen2_5_vl")
    with pytest.raises(SafeCoDeInputError, match="method"):
        llm.with_structured_output(Person, method="xml")  # type: ignore[arg-type]
    with pytest.raises(SafeCoDeInputError, match="response_format"):
        llm.invoke("hi", response_format={"type": "yaml"})
    with pytest.raises(SafeCoDeInputError, match="without tools"):
        llm.invoke("hi", tool_choice="any")


# =========================================================================== nesting bounds


def deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


def test_nesting_is_measured_without_recursion() -> None:
    from safecode_guard.tools import json_text_depth, nesting_depth

    assert nesting_depth(1) == 0 and nesting_depth({"a": [1, {"b": 2}]}) == 3
    assert nesting_depth(deep(100_000)) == 65  # stops counting past the bound, never overflows
    assert json_text_depth('{"a": "[[[", "b": [{}]}') == 3 and json_text_depth('"\\\\"[') == 1
    assert json_text_depth("[" * 100_000) == 100_000


def test_deep_model_output_is_an_invalid_call_or_text_never_a_recursion_error() -> None:
    deep_args = '{"k": ' + "[" * 2000 + "1" + "]" * 2000 + "}"  # json.dumps itself cannot write this
    parsed = parse_answer('<tool_call>{"name": "add", "arguments": ' + deep_args + "}</tool_call>", NAMES)
    assert parsed.tool_calls == [] and "nested more than 64" in parsed.invalid_tool_calls[0]["error"]
    plain = parse_answer('{"name": "add", "parameters": ' + deep_args + "}", NAMES)
    assert "nested more than" in plain.invalid_tool_calls[0]["error"]
    assert parse_answer("[" * 2000 + "]" * 2000, NAMES).content == "[" * 2000 + "]" * 2000
    as_string = json.dumps({"name": "add", "arguments": deep_args})  # OpenAI style: the arguments in a string
    in_string = parse_answer(f"<tool_call>{as_string}</tool_call>", NAMES)
    assert in_string.tool_calls == [] and "nested more than 64" in in_string.invalid_tool_calls[0]["error"]
    fine = parse_answer('<tool_call>{"name": "add", "arguments": ' + json.dumps({"a": deep(60)}) + "}</tool_call>", NAMES)
    assert fine.tool_calls and not fine.invalid_tool_calls  # real arguments stay well inside the bound


def test_deep_openai_tool_arguments_are_an_input_limit_error() -> None:
    from safecode_guard import InputLimitError
    from safecode_guard.openai_messages import to_langchain

    def history(arguments: str) -> list[dict[str, Any]]:
        call = {"type": "function", "id": "c", "function": {"name": "f", "arguments": arguments}}
        return [{"role": "assistant", "content": None, "tool_calls": [call]}]

    with pytest.raises(InputLimitError, match=r"messages\[0\].tool_calls\[0\].function.arguments is nested"):
        to_langchain(history('{"a":' * 1000 + "1" + "}" * 1000))
    assert to_langchain(history(json.dumps({"a": deep(60)})))[0].tool_calls[0]["args"] == {"a": deep(60)}


def test_deep_schemas_and_histories_are_typed_errors() -> None:
    from safecode_guard import InputLimitError
    from safecode_guard.tools import hf_tool_calls

    deep_schema = {"type": "function", "function": {"name": "f", "parameters": deep(2000)}}
    with pytest.raises(InputLimitError, match="tools\\[0\\]"):
        format_tools([deep_schema])
    with pytest.raises(InputLimitError, match="add"):
        hf_tool_calls([{"name": "add", "args": {"a": deep(2000)}, "id": "c1"}])
    processor = tool_processor_stub()
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": deep(2000)}}}]},
        {"role": "tool", "content": "3", "tool_call_id": "c1"},
    ]
    with pytest.raises(InputLimitError, match=r"messages\[1\].tool_calls\[0\]"):
        render_prompt(processor, history)
    with pytest.raises(InputLimitError, match=r"tools\[0\]"):
        render_prompt(processor, history[:1], tools=[deep_schema])


def test_a_deep_conversation_is_refused_and_the_model_stays_usable(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    from langchain_core.caches import InMemoryCache

    from safecode_guard import InputLimitError

    deep_history = [
        HumanMessage("Add them."),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": deep(2000)}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("3", tool_call_id="c1"),
    ]
    for llm in (chat("qwen2_5_vl").bind_tools([add]), chat("qwen2_5_vl", cache=InMemoryCache()).bind_tools([add])):
        with pytest.raises(InputLimitError, match="nested more than"):
            llm.invoke(deep_history)
        with pytest.raises(InputLimitError):
            list(llm.stream(deep_history))
    with pytest.raises(InputLimitError):
        chat("qwen2_5_vl").invoke([HumanMessage([{"type": "text", "text": "x", "extras": deep(2000)}])])
    with pytest.raises(InputLimitError):
        chat("qwen2_5_vl").with_structured_output(deep(2000, {"type": "object"}) | {"title": "T"})
    with pytest.raises(InputLimitError):
        chat("qwen2_5_vl").invoke("hi", response_format={"type": "json_schema", "json_schema": {"schema": deep(2000)}})
    with pytest.raises(InputLimitError):
        chat("qwen2_5_vl").get_num_tokens_from_messages(deep_history)
    engine = chat("qwen2_5_vl").engine
    with pytest.raises(InputLimitError):  # refused while preparing: never queued, no scripted reply taken
        engine.generate([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": deep(2000)}}}]},
            {"role": "user", "content": "again"}], max_new_tokens=2)
    script.add("Fine.")
    assert chat("qwen2_5_vl").invoke("hi").content == "Fine."


def test_a_deep_json_answer_is_a_parse_error(load_tiny_vlm: Callable[[str], tuple[Any, Any]], script: ScriptedDecoding) -> None:
    model, processor = load_tiny_vlm("llava")
    llm = ChatSafeCoDe.from_model(model, processor, judge="fixed:safe", max_new_tokens=300)
    script.add('"a": ' + "[" * 100 + "]" * 100 + "}")
    with pytest.raises(OutputParserException, match="nested more than"):
        llm.with_structured_output(None, method="json_mode").invoke("Anything")  # type: ignore[arg-type]
