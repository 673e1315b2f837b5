"""`tool_choice="auto"` under a grammar, without a model (issue 20, item 2).

Free text until a call opens, then the call's JSON constrained to the bound
tools, then free again. Random walks over the grammar's allowed tokens stand
in for a random model that opens calls: whatever they write, the answer
reader finds only valid calls of bound tools. Tokenizer: the tiny models'
byte-level BPE, with Qwen's call tags added as tokens of their own (as
Qwen2.5's tokenizer has them) or spelled out.
"""

from __future__ import annotations

import random

import jsonschema
import pytest

from safecode_guard.constrained import GrammarCompiler, auto_call_constraint, tool_call_constraint
from safecode_guard.constrained.grammar import _literal
from safecode_guard.langchain.tools import parse_answer
from safecode_guard.testing import make_tokenizer

pytest.importorskip("llguidance")

TOOLS = {
    "get_weather": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                    "required": ["city", "days"]},
    "is_open": {"type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"]},
}
HERMES = dict(call_open='<tool_call>\n{"name": "', name_to_args='", "arguments": ', call_close="}\n</tool_call>", marker="<tool_call>")
LLAMA = dict(call_open='{"name": "', name_to_args='", "parameters": ', call_close="}", marker=None)


@pytest.fixture(scope="module", params=["tags as tokens", "tags spelled"])
def tok(request):
    tok = make_tokenizer(["<|im_start|>", "<|im_end|>"])
    if request.param == "tags as tokens":
        tok.add_tokens(["<tool_call>", "</tool_call>"])
    return tok


def tags_of(tok) -> dict[str, int]:
    return {t: i for t, i in tok.get_added_vocab().items() if "tool_call" in t}


def walk(tok, constraint, seed: int, opener: list[int], limit: int = 160) -> str:
    """Random allowed tokens; at a random point, the opener's tokens (a model deciding to call)."""
    rng = random.Random(seed)
    row = GrammarCompiler(tok, [tok.eos_token_id], len(tok)).start(constraint)
    start_call = rng.randrange(0, 12)
    out: list[int] = []
    script: list[int] = []
    while len(out) < limit and not row.done:
        allowed = row.allowed()
        if len(out) == start_call:
            script = list(opener)
        if script and allowed[script[0]]:
            token = script.pop(0)
        else:
            script = []
            token = rng.choice(allowed.nonzero().flatten().tolist())
        row.accept(token)
        if token == tok.eos_token_id:
            break
        out.append(token)
    return tok.decode(out)


@pytest.mark.parametrize("parallel", [True, False])
def test_every_call_an_auto_answer_holds_is_a_valid_call_of_a_bound_tool(tok, parallel) -> None:
    constraint = auto_call_constraint(TOOLS, **HERMES, parallel=parallel, tags=tags_of(tok))
    opener = tok.encode('<tool_call>\n{"name": "', add_special_tokens=False)
    made = 0
    for seed in range(10):
        text = walk(tok, constraint, seed, opener)
        parsed = parse_answer(text, list(TOOLS))
        assert not parsed.invalid_tool_calls, text
        for call in parsed.tool_calls:
            jsonschema.validate(call["args"], TOOLS[call["name"]])
        assert parallel or len(parsed.tool_calls) <= 1
        made += len(parsed.tool_calls)
    assert made >= 5  # the walks did open calls


def test_text_alone_is_a_complete_answer_and_a_half_written_tag_is_not_a_call(tok) -> None:
    row = GrammarCompiler(tok, [tok.eos_token_id], len(tok)).start(auto_call_constraint(TOOLS, **HERMES, tags=tags_of(tok)))
    for t in tok.encode("Hi <b>there</b> <tool_", add_special_tokens=False):
        assert row.allowed()[t]
        row.accept(t)
    assert row.matcher.is_accepting()  # the end token may end a text answer anywhere
    # and the text goes on freely after a "<" that does not open a call
    assert row.allowed()[tok.encode("x", add_special_tokens=False)[0]]


def test_in_the_json_layout_an_answer_is_text_or_one_call(tok) -> None:
    constraint = auto_call_constraint(TOOLS, **LLAMA)
    opener = tok.encode('{"name": "', add_special_tokens=False)
    for seed in range(8):
        text = walk(tok, constraint, seed, opener)
        parsed = parse_answer(text, list(TOOLS))
        assert not parsed.invalid_tool_calls, text
        if text.lstrip().startswith("{"):
            (call,) = parsed.tool_calls
            jsonschema.validate(call["args"], TOOLS[call["name"]])
        else:
            assert not parsed.tool_calls


def test_a_call_tag_the_tokenizer_has_may_be_its_token_or_spelled_out() -> None:
    assert _literal("}\n</tool_call>", {"</tool_call>": 7}) == '"}\\n" (<[7]> | "</tool_call>")'
    assert _literal("}", {"</tool_call>": 7}) == '"}"'
    forced = tool_call_constraint(TOOLS, name_to_args='", "arguments": ', call_close="}\n</tool_call>", tags={"</tool_call>": 7})
    assert '(<[7]> | "</tool_call>")' in forced.grammar
    with pytest.raises(ValueError, match="marker"):
        auto_call_constraint(TOOLS, **{**HERMES, "call_open": '{"name": "'})
