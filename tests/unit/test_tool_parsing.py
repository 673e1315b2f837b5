"""Tool calling's pure functions (`safecode_guard.tools`): schemas, `tool_choice`, the splitter and call
parser, the template probe, and the message conversion of tool turns. No model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import (
    AIMessage,
)
from support.tools import HERMES_CALL, NAMES, TOOL_HISTORY, Person, get_weather, tool_processor_stub

from safecode_guard import (
    InputPolicy,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from safecode_guard.lc_messages import to_hf_messages
from safecode_guard.prompting import parse_messages, render_prompt
from safecode_guard.testing import (
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


def ids() -> Callable[[], str]:
    counter = iter(range(1000))
    return lambda: f"call_{next(counter)}"


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


def test_tool_calls_in_history_must_have_the_transformers_shape() -> None:
    bad = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
           {"role": "user", "content": "again"}]
    with pytest.raises(UnsupportedContentError, match="tool_calls"):
        parse_messages(bad, InputPolicy())
