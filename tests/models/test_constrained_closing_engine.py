"""Constrained answers that close within `max_new_tokens`, through the real engine on tiny random models.

A random model decoding greedily under a schema with unbounded strings loops
inside the first string; with `SafeCoDeConfig.close_constrained` (the
default) the answer still ends as a valid instance within its budget, says so
(`closed_early`), and decodes in a batch exactly as alone.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from support.messages import user_turn

from safecode_guard import SafeCoDe, SafeCoDeConfig
from safecode_guard.constrained import (
    auto_call_constraint,
    json_schema_constraint,
    tool_call_constraint,
)
from safecode_guard.testing import gradient_image, stripes_image

pytest.importorskip("llguidance")

FAMILIES = ("llava", "qwen2_5_vl")

#: LangChain's standard-suite Joke: two unbounded strings.
JOKE = {
    "type": "object",
    "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
    "required": ["setup", "punchline"],
}


SEARCH = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Search.", "parameters": SEARCH}}
AUTO = auto_call_constraint({"search": SEARCH}, call_open='<tool_call>\n{"name": "', name_to_args='", "arguments": ',
                            call_close="}\n</tool_call>", marker="<tool_call>")


def engine(tool_models, family: str, **config: Any) -> SafeCoDe:
    model, processor = tool_models[family]
    return SafeCoDe(model, processor, config=SafeCoDeConfig(**config), judge="fixed:safe")


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unbounded_schema_closes_valid_within_the_budget(tool_models, family):
    eng = engine(tool_models, family)
    for max_new_tokens, kwargs in [(40, {}), (33, {"do_sample": True, "temperature": 1.2, "seed": 3}), (60, {})]:
        result = eng.generate(user_turn("A joke, please.", gradient_image()), constraint=json_schema_constraint(JOKE),
                              max_new_tokens=max_new_tokens, **kwargs)
        assert result.finish_reason == "stop" and len(result.token_ids) <= max_new_tokens
        jsonschema.validate(json.loads(result.text), JOKE)
        assert result.closed_early  # random weights never close a string on their own


def test_without_closing_the_same_answer_is_cut_at_the_limit(tool_models):
    eng = engine(tool_models, "qwen2_5_vl", close_constrained=False)
    result = eng.generate(user_turn("A joke, please."), constraint=json_schema_constraint(JOKE), max_new_tokens=40)
    assert result.finish_reason == "length" and len(result.token_ids) == 40 and not result.closed_early
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.text)


def test_a_free_answer_is_never_closed(tool_models):
    result = engine(tool_models, "llava").generate(user_turn("Hello"), max_new_tokens=12)
    assert not result.constrained and not result.closed_early and result.finish_reason == "length"


def test_a_forced_call_closes_with_valid_arguments(tool_models):
    eng = engine(tool_models, "qwen2_5_vl")
    tools = {"search": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
    constraint = tool_call_constraint(tools, name_to_args='", "arguments": ', call_close="}\n</tool_call>", named="search")
    result = eng.generate(user_turn("Find cats."), constraint=constraint, answer_prefix='<tool_call>\n{"name": "search", "arguments": ',
                          max_new_tokens=40)
    assert result.finish_reason == "stop" and result.closed_early and result.text.endswith("}\n</tool_call>")
    jsonschema.validate(json.loads(result.text[: -len("}\n</tool_call>")]), tools["search"])


def test_closing_rows_in_a_batch_get_the_tokens_they_get_alone(tool_models):
    eng = engine(tool_models, "qwen2_5_vl")
    requests = [
        (user_turn("A joke.", gradient_image()), {"constraint": json_schema_constraint(JOKE), "max_new_tokens": 36}),
        (user_turn("Describe the image.", stripes_image()), {"max_new_tokens": 30}),
        (user_turn("Another joke."), {"constraint": json_schema_constraint(JOKE), "max_new_tokens": 50, "do_sample": True, "seed": 4}),
        (user_turn("A third one."), {"constraint": json_schema_constraint(JOKE), "max_new_tokens": 200}),
        # tool_choice="auto": free text (the row's grammar allows calls)
        (user_turn("Weather?"), {"constraint": AUTO, "tools": [SEARCH_TOOL], "max_new_tokens": 14}),
    ]
    alone = [eng.generate(m, **kw) for m, kw in requests]
    assert [r.closed_early for r in alone[:3]] == [True, False, True]  # the fourth has room to spare
    assert alone[4].constrained and not alone[4].closed_early and alone[4].finish_reason == "length"
    scheduler = eng.scheduler
    before = scheduler.stats["shared_prefills"]
    streams = [eng.stream(m, start=False, **kw) for m, kw in requests]
    with scheduler._cond:  # the worker admits them in one round: one prefill, shared steps
        for stream in streams:
            stream.start()
    together = [s.consume() for s in streams]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.closed_early for r in together] == [r.closed_early for r in alone]
    assert scheduler.stats["shared_prefills"] == before + 1


def test_min_tokens_cannot_ask_a_json_answer_to_go_on_past_its_end(tool_models):
    from safecode_guard import SafeCoDeInputError
    from safecode_guard.constrained import json_object_constraint

    eng = engine(tool_models, "llava")
    for constraint in (json_schema_constraint(JOKE), json_object_constraint()):
        with pytest.raises(SafeCoDeInputError, match="min_tokens") as info:
            eng.generate(user_turn("A joke?"), constraint=constraint, max_new_tokens=16, min_tokens=4)
        assert info.value.param == "min_tokens"
    # free text under the "auto" grammar takes it: no end token before the sixth
    free = eng.generate(user_turn("A joke?"), constraint=AUTO, max_new_tokens=6, min_tokens=6)
    assert len(free.token_ids) == 6
