"""Constrained decoding's parts without a model: grammar text, bitmask, errors, cache, masked choice.

Tokenizers: the tiny models' byte-level BPE (`testing.make_tokenizer`, GPT-2 /
Llama-3 style) and a SentencePiece-style BPE with "▁" spaces and <0xXX> byte
fallback (Llama-2 style), built here.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from safecode_guard import ops
from safecode_guard.config import SafeCoDeConfig
from safecode_guard.constrained import (
    JSON_SEPARATORS,
    GrammarCompiler,
    UnsupportedSchemaError,
    json_object_constraint,
    json_schema_constraint,
    schema_error,
    tool_call_constraint,
    tool_parameters,
    unpack_bitmask,
)
from safecode_guard.constrained.grammar import closed_objects
from safecode_guard.engine.decoding import Steering
from safecode_guard.errors import SafeCoDeInputError
from safecode_guard.testing import CORPUS, make_tokenizer

pytest.importorskip("llguidance")  # the `constrained` extra (in `test` too): CI always has it

FINITE = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "dark green", "blue"]},
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["ok", "color", "name", "n", "tags"],
}


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: BPE over "▁"-marked words, unknown bytes as <0xXX> tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    data = json.loads(tok.to_str())
    trained = sorted((i, t) for t, i in data["model"]["vocab"].items() if i >= 3)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for _, t in trained:
        vocab.setdefault(t, len(vocab))
    data["model"]["vocab"] = vocab
    data["pre_tokenizer"] = None  # SentencePiece splits nothing before the model
    decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    data["decoder"] = json.loads(decoder.__getstate__())
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer(["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def sentencepiece():
    return sentencepiece_tokenizer()


def compiler_for(tok, vocab_size: int | None = None) -> GrammarCompiler:
    return GrammarCompiler(tok, [tok.eos_token_id], vocab_size or len(tok))


def random_walk(tok, compiler: GrammarCompiler, constraint, seed: int, limit: int = 200) -> tuple[str, bool]:
    """Uniformly random allowed tokens until the grammar is complete: (text, completed)."""
    rng = random.Random(seed)
    row = compiler.start(constraint)
    out: list[int] = []
    for _ in range(limit):
        token = rng.choice(row.allowed().nonzero().flatten().tolist())
        row.accept(token)
        if token == tok.eos_token_id:
            break
        out.append(token)
        if row.done:
            return tok.decode(out), True
    return tok.decode(out), False


# -- grammar text (pure) -----------------------------------------------------------------------


def test_closed_objects_closes_listed_properties_everywhere_and_keeps_explicit_choices() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"D": {"type": "object", "properties": {"x": {}}}},
        "anyOf": [{"type": "object", "properties": {"y": {}}, "additionalProperties": True}],
        "items": {"type": "object", "properties": {"z": {}}, "patternProperties": {"^q": {}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is True  # said explicitly: kept
    assert "additionalProperties" not in closed["items"]  # patternProperties: open on purpose
    assert "additionalProperties" not in schema  # the caller's schema is untouched
    assert closed_objects({"type": "object"}) == {"type": "object"}  # JSON mode stays any object


def test_grammar_text_embeds_the_schema_under_the_whitespace_policy() -> None:
    c = json_schema_constraint({"type": "boolean", "x-guidance": {"whitespace_flexible": True, "lenient": True}})
    assert c.kind == "json_schema" and c.grammar.startswith("start: %json")
    embedded = json.loads(c.grammar[len("start: %json") :])
    assert embedded["x-guidance"] == {
        "whitespace_flexible": False, "lenient": True,
        "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1],
    }
    assert json_object_constraint().kind == "json_object"
    with pytest.raises(TypeError, match="mapping"):
        json_schema_constraint(["not", "a", "schema"])  # type: ignore[arg-type]


def test_tool_call_constraint_names_only_the_given_tools() -> None:
    tools = tool_parameters([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "add"}},
    ])
    assert tools["add"] == {"type": "object"}
    any_call = tool_call_constraint(tools, name_to_args='", "arguments": ', call_close="}\n</tool_call>")
    assert '"get_weather\\", \\"arguments\\": "' in any_call.grammar and '"add\\"' in any_call.grammar
    named = tool_call_constraint(tools, name_to_args="", call_close="}", named="add")
    assert "get_weather" not in named.grammar
    with pytest.raises(ValueError, match="'nope' is not one of"):
        tool_call_constraint(tools, name_to_args="", call_close="", named="nope")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_constraint({}, name_to_args="", call_close="")


def test_unpack_bitmask_reads_llguidance_bit_order_and_pads_wider_heads() -> None:
    words = torch.tensor([0b101, -(2**31)], dtype=torch.int32).numpy().tobytes()  # tokens 0, 2 and 63
    allowed = unpack_bitmask(words, 70)
    assert allowed.shape == (70,) and allowed.nonzero().flatten().tolist() == [0, 2, 63]
    assert unpack_bitmask(words, 3).tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("message", "keywords"),
    [
        ('Unimplemented keys: ["if", "then"]', ("if", "then")),
        ('at 1(8): failed to compile JSON schema: Unimplemented keys: ["not"]\n   1 | start: ...', ("not",)),
        ("Unknown format: uri-reference", ("format",)),
        ("Pointer '/defs/nope' does not exist", ()),
    ],
)
def test_schema_error_names_the_unsupported_keyword(message: str, keywords: tuple[str, ...]) -> None:
    error = schema_error(message, "json_schema")
    assert isinstance(error, UnsupportedSchemaError) and isinstance(error, SafeCoDeInputError)
    assert error.keywords == keywords
    for k in keywords:
        assert f"`{k}`" in str(error)
    assert "1 |" not in str(error) and "at 1(8)" not in str(error)  # llguidance's grammar excerpt stays out


# -- compiling against real tokenizers ---------------------------------------------------------


@pytest.mark.parametrize("schema", [{"not": {"type": "string"}}, {"type": "object", "properties": {"u": {"type": "string", "format": "nope"}}}])
def test_uncompilable_schema_is_a_typed_error_and_the_compiler_stays_usable(bpe, schema) -> None:
    compiler = compiler_for(bpe)
    with pytest.raises(UnsupportedSchemaError) as info:
        compiler.compile(json_schema_constraint(schema))
    assert info.value.keywords in (("not",), ("format",))
    assert compiler.compile(json_schema_constraint({"type": "boolean"})) is not None


def test_compiled_grammars_are_cached_and_each_row_starts_fresh(bpe) -> None:
    compiler = compiler_for(bpe)
    c = json_schema_constraint(FINITE)
    first, second = compiler.start(c), compiler.start(json_schema_constraint(FINITE))
    assert compiler.stats["misses"] == 1 and compiler.stats["hits"] == 1
    assert compiler.stats["compile_s"] > 0
    opening = bpe.encode('{"ok', add_special_tokens=False)
    for t in opening:
        first.accept(t)
    assert second.allowed()[opening[0]] and not second.allowed()[bpe.encode("x", add_special_tokens=False)[0]]


@pytest.mark.parametrize("tokenizer", ["bpe", "sentencepiece"])
def test_random_tokens_under_the_mask_always_give_valid_json(tokenizer, request) -> None:
    tok = request.getfixturevalue(tokenizer)
    compiler = compiler_for(tok)
    c = json_schema_constraint(FINITE)
    for seed in range(8):
        text, done = random_walk(tok, compiler, c, seed)
        assert done, text
        jsonschema.validate(json.loads(text), FINITE)
        assert "  " not in text and "\n" not in text.replace("\\n", "")  # no free whitespace


def test_tool_call_grammar_gives_a_parseable_call_of_a_bound_tool(bpe) -> None:
    params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}
    tools = {"get_weather": params, "is_open": {"type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"]}}
    compiler = compiler_for(bpe)
    c = tool_call_constraint(tools, name_to_args='", "arguments": ', call_close="}\n</tool_call>")
    for seed in range(6):
        text, done = random_walk(bpe, compiler, c, seed)
        assert done and text.endswith("}\n</tool_call>"), text
        call = json.loads('{"name": "' + text[: -len("\n</tool_call>")])
        jsonschema.validate(call["arguments"], tools[call["name"]])


def test_model_head_wider_than_the_tokenizer_never_allows_the_extra_ids(bpe) -> None:
    compiler = compiler_for(bpe, vocab_size=len(bpe) + 40)
    allowed = compiler.start(json_object_constraint()).allowed()
    assert allowed.shape == (len(bpe) + 40,) and not allowed[len(bpe) :].any()


# -- the mask inside SafeCoDe's token choice ---------------------------------------------------


def steering(compiler, constraint, label="safe", window=3, contrastive=True, **sampling) -> Steering:
    return Steering(
        SafeCoDeConfig(), [(5, 6)], label, window, contrastive, ops.Sampling(**sampling),
        torch.Generator().manual_seed(0) if sampling.get("do_sample") else None, compiler.start(constraint),
    )


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "top_k": 50}])
def test_window_contrast_and_modulation_choose_among_allowed_tokens_only(bpe, sampling) -> None:
    compiler = compiler_for(bpe)
    s = steering(compiler, json_schema_constraint(FINITE), **sampling)
    assert not s.plain_greedy  # constrained rows never take the batch's plain argmax
    gen = torch.Generator().manual_seed(1)
    ids: list[int] = []
    while not s.grammar_done and len(ids) < 200:
        logits = torch.randn(s.rows, len(bpe), generator=gen) * 5
        logits[:, 5] = 100.0  # a refusal-set token the unconstrained choice would take every time
        token = s.choose(logits)
        s.accept(token)
        ids.append(token)
    assert s.grammar_done
    jsonschema.validate(json.loads(bpe.decode(ids)), FINITE)


def test_call_close_is_read_from_the_rendered_turn_up_to_the_end_of_turn_marker() -> None:
    from safecode_guard.constrained import call_close

    qwen = '<tool_call>\n{"name": "t", "arguments": {"a": "x", "b": {"c": [1]}}}\n</tool_call><|im_end|>\n'
    assert call_close(qwen, qwen.index('{"a"'), ["<|im_start|>", "<|im_end|>"]) == "}\n</tool_call>"
    llama = '{"name": "t", "parameters": {"a": "}"}}<|eot_id|>'
    assert call_close(llama, llama.index('{"a"'), ["<|eot_id|>"]) == "}"
    assert call_close('{"name": "t", "arguments": nope}', 27) is None


def test_forced_call_constraint_follows_the_tool_choice() -> None:
    from safecode_guard.constrained import forced_call_constraint

    one = [{"type": "function", "function": {"name": "solo", "parameters": {"type": "object", "properties": {"x": {"type": "boolean"}}}}}]
    two = [*one, {"type": "function", "function": {"name": "other"}}]
    layout = {"name_to_args": '", "arguments": ', "close": "}"}
    assert forced_call_constraint(two, "auto", **layout) is None
    assert forced_call_constraint(two, "any", name_to_args=None, close="}") is None  # layout unknown
    # "any" with one tool opens that tool's call (tools.forced_prefix): only its arguments follow
    assert forced_call_constraint(one, "any", **layout).grammar == forced_call_constraint(one, "solo", **layout).grammar
    both = forced_call_constraint(two, "any", **layout).grammar
    assert '"solo\\", \\"arguments\\": "' in both and '"other\\", \\"arguments\\": "' in both


def test_call_close_drops_an_end_of_turn_marker_the_tokenizer_reads_as_text() -> None:
    from safecode_guard.constrained import call_close

    # a Llama 3.1 layout on a tokenizer where <|eot_id|> is no special token: the turn's end still comes off
    turn = '{"name": "t", "parameters": {"a": 1}}<|eot_id|>'
    assert call_close(turn, turn.index('{"a"'), (), turn_end="<|eot_id|>") == "}"
    assert call_close(turn, turn.index('{"a"'), ()) == "}<|eot_id|>"  # unknown turn end: kept as written
