"""`SamplingParams`: one request model with one set of limits, and the options decoding honours.

The engine's keyword arguments build one; `min_p`, `repetition_penalty`,
`min_tokens` and `logprobs` / `top_logprobs` change decoding (or report it)
the way transformers and vLLM users expect.
"""

from __future__ import annotations

import math

import pytest
import torch

from safecode_guard import SafeCoDe, SafeCoDeInputError, ops
from safecode_guard.errors import InputLimitError
from safecode_guard.sampling import LIMITS, SamplingParams

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def engine(tiny_vlm):
    return SafeCoDe(*tiny_vlm, judge="fixed:safe")


@pytest.mark.parametrize(("options", "field", "kind"), [
    ({"temperature": 3}, "temperature", SafeCoDeInputError),
    ({"temperature": -0.1}, "temperature", SafeCoDeInputError),
    ({"top_p": 0}, "top_p", SafeCoDeInputError),
    ({"min_p": 1.5}, "min_p", SafeCoDeInputError),
    ({"repetition_penalty": 0}, "repetition_penalty", SafeCoDeInputError),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", SafeCoDeInputError),
    ({"top_logprobs": 2}, "top_logprobs", SafeCoDeInputError),
    ({"min_tokens": 9, "max_new_tokens": 4}, "min_tokens", SafeCoDeInputError),
    ({"seed": 2**63}, "seed", SafeCoDeInputError),
    ({"stop": ["x"] * 17}, "stop", InputLimitError),
    ({"top_k": True}, "top_k", SafeCoDeInputError),
])
def test_each_limit_names_its_field_the_value_and_the_fix(options, field, kind):
    with pytest.raises(kind) as info:
        SamplingParams.build(**options)
    message = str(info.value)
    assert message.startswith(f"`{field}` (=") and info.value.param == field
    if field in ("temperature", "top_p", "min_p", "repetition_penalty", "seed", "stop"):
        assert LIMITS[field][0] in message


def test_unknown_options_suggest_the_close_one():
    with pytest.raises(SafeCoDeInputError, match="did you mean `top_p`"):
        SamplingParams.build(top_pp=0.5)


def test_the_engine_refuses_what_the_params_refuse_with_the_same_message(engine):
    for options in ({"temperature": 3}, {"min_p": 2}, {"repetition_penalty": -1}):
        with pytest.raises(SafeCoDeInputError) as direct:
            SamplingParams.build(**options)
        with pytest.raises(SafeCoDeInputError) as via_engine:
            engine.generate(MSGS, **options)
        assert str(via_engine.value) == str(direct.value)
    params = SamplingParams(max_new_tokens=3)
    assert engine.generate(MSGS, sampling=params).usage.completion_tokens <= 3
    with pytest.raises(SafeCoDeInputError, match="not both"):
        engine.generate(MSGS, sampling=params, max_new_tokens=3)


def test_min_p_keeps_only_tokens_near_the_likeliest():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    z = ops.warp(scores, ops.Sampling(True, min_p=0.2))
    assert torch.isfinite(z).tolist() == [True, True, True, False]  # 0.05 < 0.2 * 0.5


def test_repetition_penalty_is_transformers_rule():
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.tensor([2.0, -1.0, 0.5, 3.0])
    ours = ops.penalize(scores, {0: 2, 1: 1}, repetition_penalty=1.5)
    theirs = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[0, 1, 0]]), scores[None].clone())[0]
    assert torch.allclose(ours, theirs)


def test_min_tokens_holds_off_the_end(tiny_vlm):
    model, processor = tiny_vlm
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    plain = engine.generate(MSGS, max_new_tokens=12)
    # make the first token an end-of-sequence token: without min_tokens the answer is one token
    eos = sorted(engine._eos_ids)[0]
    ended = engine.generate(MSGS, max_new_tokens=12, logit_bias={eos: 100})
    assert ended.token_ids == [eos] and plain.token_ids != ended.token_ids
    held = engine.generate(MSGS, max_new_tokens=12, logit_bias={eos: 100}, min_tokens=5)
    assert len(held.token_ids) >= 5 and eos not in held.token_ids[:5]


def test_logprobs_report_the_distribution_each_token_came_from(engine):
    greedy = engine.generate(MSGS, max_new_tokens=6, logprobs=True, top_logprobs=3)
    assert greedy.logprobs is not None and len(greedy.logprobs) == len(greedy.token_ids)
    for entry, token in zip(greedy.logprobs, greedy.token_ids, strict=True):
        assert entry.token_id == token and len(entry.top_logprobs) == 3
        # greedy: the chosen token is the likeliest of its distribution
        assert entry.top_logprobs[0].token_id == token and math.isclose(entry.logprob, entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0
    assert engine.generate(MSGS, max_new_tokens=6).logprobs is None
    # the same answer with or without logprobs (recording never changes the choice)
    assert engine.generate(MSGS, max_new_tokens=6).token_ids == greedy.token_ids
    sampled = engine.generate(MSGS, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=3, logprobs=True,
                              top_logprobs=5)
    for entry in sampled.logprobs:
        # drawn from the top-5 warped distribution: every alternative outside it is -9999 (dropped)
        assert entry.logprob > -9999.0
        assert math.isclose(sum(math.exp(t.logprob) for t in entry.top_logprobs), 1.0, rel_tol=1e-4)
    again = engine.generate(MSGS, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, seed=3)
    assert again.token_ids == sampled.token_ids


def test_every_option_reaches_every_face():
    """Adding a field to SamplingParams is one place plus this guard: each face names it."""
    import inspect

    from safecode_guard.serving.protocol import ChatCompletionRequest

    fields = set(SamplingParams.model_fields)
    assert fields == set(LIMITS)
    engine_args = set(inspect.signature(SafeCoDe.stream).parameters)
    assert fields <= engine_args, fields - engine_args
    # the protocol spells max_new_tokens OpenAI's way, and sampling follows from temperature
    wire = (fields - {"max_new_tokens", "do_sample"}) | {"max_tokens", "max_completion_tokens"}
    assert wire <= set(ChatCompletionRequest.model_fields), wire - set(ChatCompletionRequest.model_fields)
    from safecode_guard.langchain.settings import CALL_OPTIONS
    from safecode_guard.nemo.settings import REQUEST_OPTIONS

    assert fields <= set(CALL_OPTIONS) and fields <= REQUEST_OPTIONS


def test_chat_model_reports_logprobs_and_takes_the_new_options(tiny_vlm):
    from safecode_guard import ChatSafeCoDe

    llm = ChatSafeCoDe.from_model(*tiny_vlm, judge="fixed:safe", max_new_tokens=5)
    answer = llm.invoke("hi", logprobs=True, top_logprobs=2)
    entries = answer.response_metadata["logprobs"]["content"]
    assert len(entries) == answer.usage_metadata["output_tokens"] and all(len(e["top_logprobs"]) == 2 for e in entries)
    merged = None
    for chunk in llm.stream("hi", logprobs=True, top_logprobs=2):
        merged = chunk if merged is None else merged + chunk
    assert merged.response_metadata["logprobs"]["content"] == entries
    assert "logprobs" not in llm.invoke("hi").response_metadata
    assert llm.invoke("hi", min_p=0.0, repetition_penalty=1.0, min_tokens=2).content == llm.invoke("hi").content
    with pytest.raises(SafeCoDeInputError, match="min_p"):
        llm.invoke("hi", min_p=1.5)
