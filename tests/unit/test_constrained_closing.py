"""Closing a constrained answer within its token budget, without a model (issue 20, items 1 and 5).

A row given its budget (`GrammarCompiler.start(constraint, budget)`) lets the
model choose while the grammar's shortest completion still fits after the
choice, and follows that completion once it would not: the answer ends as a
complete, valid instance. Where even the completion cannot fit, nothing
changes and the answer is cut. Tokenizer: the tiny models' byte-level BPE.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from safecode_guard import ops
from safecode_guard.config import SafeCoDeConfig
from safecode_guard.constrained import GrammarCompiler, json_schema_constraint, tool_call_constraint
from safecode_guard.constrained.matcher import CLOSE_WINDOW, closing_path
from safecode_guard.engine.decoding import Steering
from safecode_guard.testing import make_tokenizer

pytest.importorskip("llguidance")

#: LangChain's standard-suite Joke, plus a nested part: unbounded strings a random model never closes.
JOKE = {
    "type": "object",
    "properties": {
        "setup": {"type": "string"},
        "punchline": {"type": "string"},
        "rating": {"type": "integer", "minimum": 3},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "meta": {"type": "object", "properties": {"lang": {"enum": ["en", "fr"]}, "ok": {"type": "boolean"}},
                 "required": ["lang", "ok"]},
    },
    "required": ["setup", "punchline", "rating", "tags", "meta"],
}


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer(["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module")
def compiler(bpe):
    return GrammarCompiler(bpe, [bpe.eos_token_id], len(bpe))


def shortest(compiler, constraint) -> list[int]:
    row = compiler.start(constraint, budget=1000)
    path = closing_path(row.matcher, row.closing, 1000)
    assert path is not None
    return path


def decode(tok, ids: list[int]) -> str:
    return tok.decode([t for t in ids if t != tok.eos_token_id])


def walk(tok, compiler, constraint, budget: int, seed: int, stay_in_strings: bool = True) -> tuple[list[int], bool, bool]:
    """A budgeted row driven by random allowed tokens, like a random model's choices:
    (tokens, completed, closed). `stay_in_strings` avoids `"` while another token fits (a model
    looping inside a string, the case that never ends on its own)."""
    rng = random.Random(seed)
    row = compiler.start(constraint, budget=budget)
    quote = tok.encode('"', add_special_tokens=False)[0]
    out: list[int] = []
    while len(out) < budget:
        allowed = row.apply(torch.zeros(len(tok))).isfinite().nonzero().flatten().tolist()
        choices = [t for t in allowed if t != quote] if stay_in_strings and len(allowed) > 1 else allowed
        token = row.settle(rng.choice(choices))
        assert token in allowed  # a closing token is always one the grammar allows
        row.accept(token)
        out.append(token)
        if token == tok.eos_token_id or row.done:
            return out, True, row.closed
    return out, False, row.closed


def test_the_closing_path_completes_the_grammar_from_wherever_the_answer_stands(bpe, compiler) -> None:
    constraint = json_schema_constraint(JOKE)
    minimal = shortest(compiler, constraint)
    jsonschema.validate(json.loads(decode(bpe, minimal)), JOKE)  # from the start: the shortest instance
    for seed in range(6):
        rng = random.Random(seed)
        row = compiler.start(constraint, budget=1000)
        seen: list[int] = []
        for _ in range(rng.randrange(1, 40)):  # somewhere inside: a string, the array, the nested object
            token = rng.choice([t for t in row.allowed().nonzero().flatten().tolist() if t != bpe.eos_token_id])
            row.accept(token)
            seen.append(token)
            if row.done:
                break
        path = closing_path(row.matcher, row.closing, 1000)
        assert path is not None and row.consumed == len(seen)  # the row itself did not move
        assert closing_path(row.matcher, row.closing, len(path) - 1) is None  # a tighter limit: no path
        for token in path:
            row.accept(token)
        assert row.done or path[-1] == bpe.eos_token_id
        jsonschema.validate(json.loads(decode(bpe, seen + path)), JOKE)


@pytest.mark.parametrize("extra", [0, 1, 7, 40])
def test_a_budgeted_row_always_ends_valid_within_its_budget(bpe, compiler, extra) -> None:
    constraint = json_schema_constraint(JOKE)
    budget = len(shortest(compiler, constraint)) + extra
    for seed in range(5):
        tokens, completed, closed = walk(bpe, compiler, constraint, budget, seed)
        assert completed and len(tokens) <= budget, decode(bpe, tokens)
        assert closed  # the random choices loop in strings: only the closing path ends them
        jsonschema.validate(json.loads(decode(bpe, tokens)), JOKE)


def test_a_budget_too_small_for_any_complete_answer_is_cut_as_before(bpe, compiler) -> None:
    constraint = json_schema_constraint(JOKE)
    budget = len(shortest(compiler, constraint)) - 1
    tokens, completed, closed = walk(bpe, compiler, constraint, budget, seed=0)
    assert not completed and not closed and len(tokens) == budget


def test_while_there_is_room_the_models_own_choice_stands(bpe, compiler) -> None:
    constraint = json_schema_constraint(JOKE)
    row = compiler.start(constraint, budget=10 * CLOSE_WINDOW)
    rng = random.Random(3)
    for _ in range(5 * CLOSE_WINDOW):  # far from the budget's end: never replaced, never closed
        allowed = row.allowed().nonzero().flatten().tolist()
        token = rng.choice([t for t in allowed if t != bpe.eos_token_id])
        assert row.settle(token) == token
        row.accept(token)
        if row.done:
            break
    assert not row.closed
    unbudgeted = compiler.start(constraint)
    assert unbudgeted.closing is None and unbudgeted.settle(17) == 17  # no budget: closing is off


def test_a_forced_tool_call_closes_with_its_layout_and_a_bound_tool(bpe, compiler) -> None:
    tools = {
        "search": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        "rate": {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1}}, "required": ["stars"]},
    }
    constraint = tool_call_constraint(tools, name_to_args='", "arguments": ', call_close="}\n</tool_call>")
    budget = len(shortest(compiler, constraint)) + 12
    for seed in range(4):
        tokens, completed, _ = walk(bpe, compiler, constraint, budget, seed)
        text = decode(bpe, tokens)
        assert completed and text.endswith("}\n</tool_call>"), text
        call = json.loads('{"name": "' + text[: -len("\n</tool_call>")])
        jsonschema.validate(call["arguments"], tools[call["name"]])


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "temperature": 1.5, "top_k": 50}])
def test_closing_composes_with_the_window_contrast_and_sampling(bpe, compiler, sampling) -> None:
    constraint = json_schema_constraint(JOKE)
    budget = len(shortest(compiler, constraint)) + 3
    row = compiler.start(constraint, budget=budget)
    s = Steering(
        SafeCoDeConfig(), [(5, 6)], "safe", 4, True, ops.Sampling(**sampling),
        torch.Generator().manual_seed(0) if sampling.get("do_sample") else None, row,
    )
    letter = bpe.encode("a", add_special_tokens=False)[0]
    gen = torch.Generator().manual_seed(1)
    ids: list[int] = []
    while not s.grammar_done and len(ids) < budget:
        logits = torch.randn(s.rows, len(bpe), generator=gen)
        logits[:, letter] = 50.0  # the model would write "a" forever inside a string
        token = s.choose(logits)
        s.accept(token)
        ids.append(token)
        if token == bpe.eos_token_id:
            break
    assert len(ids) <= budget and row.closed
    jsonschema.validate(json.loads(decode(bpe, ids)), JOKE)


def test_closing_is_on_by_default_and_serve_can_turn_it_off() -> None:
    import argparse

    from safecode_guard.serve_cli import configure_parser, settings_from_args

    assert SafeCoDeConfig().close_constrained is True
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert settings_from_args(parser.parse_args([])).safecode.close_constrained is True
    assert settings_from_args(parser.parse_args(["--no-close-constrained"])).safecode.close_constrained is False
