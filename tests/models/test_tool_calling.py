"""Tool calling and structured output of `ChatSafeCoDe` on tiny models.

`ChatSafeCoDe` on tiny Qwen2.5-VL and Llava models whose processors
carry real tool-capable templates (Qwen2.5 `<tool_call>` tags and Llama 3.1
plain JSON, `safecode_guard.testing`). Random weights emit noise, so the
answers are scripted through `ScriptedDecoding`, a double of the token
choice only: rendering, prefill, the verdict, refusal prefixes, parsing and
LangChain's plumbing all run for real.

The pure functions of `safecode_guard.tools` are in tests/unit/test_tool_parsing.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.exceptions import ModelRefusalError, OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    ToolMessage,
)
from support.tools import (
    HERMES_CALL,
    NAMES,
    TOOL_HISTORY,
    Person,
    ScriptedDecoding,
    add,
    get_weather,
    tool_processor_stub,
)

from safecode_guard import (
    ChatSafeCoDe,
    SafeCoDeConfig,
    SafeCoDeInputError,
    UnsupportedModelError,
)
from safecode_guard.ops import opens_with_refusal
from safecode_guard.prompting import render_prompt
from safecode_guard.testing import (
    TOOL_FAMILIES,
    call_text,
    gradient_image,
)
from safecode_guard.tools import (
    format_tools,
    parse_answer,
)

FAMILIES = list(TOOL_FAMILIES)


# =========================================================================== the chat model


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


# =========================================================================== the safety property

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


# =========================================================================== structured output


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
