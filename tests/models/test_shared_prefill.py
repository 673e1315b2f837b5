"""The n answers of one request are prefilled once (`SafeCoDeStream.start(*others)`).

The first answer's stream is queued with the others in one step
(`Scheduler.submit(job, followers)`); after its prefill the others take copies
of its rows (real and noised view) and of its first logits, and each draws its
tokens with its own sampler. Every answer must be token-identical to the same
request run alone with its own seed, and the model must run one prefill, not n.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.messages import user_turn

from safecode_guard import BatchingConfig, OverloadedError, SafeCoDe, SafeCoDeConfig
from safecode_guard.testing import gradient_image

SAMPLED = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 8}


def record_prefills(engine: SafeCoDe, monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """id(prefill) -> its rows, for every prefill the model runs from now on."""
    seen: dict[int, int] = {}
    decoder = engine.scheduler.decoder
    run_chunk = decoder.run_chunk

    def recording(prefill: Any, end: int) -> Any:
        seen[id(prefill)] = prefill.size
        return run_chunk(prefill, end)

    monkeypatch.setattr(decoder, "run_chunk", recording)
    return seen


def solo(engine: SafeCoDe, messages: list[dict], **options: Any) -> list[int]:
    return engine.stream(messages, **options).consume().token_ids


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_n_answers_share_one_prefill_and_each_matches_its_solo_run(fresh, monkeypatch, family):
    model, processor = fresh(family)
    engine = SafeCoDe(model, processor, config=SafeCoDeConfig(lambda_supp=3.0), judge="fixed:safe")
    messages = user_turn("Describe the image.", gradient_image(48, 40))
    alone = [solo(engine, messages, seed=5 + i, **SAMPLED) for i in range(3)]
    greedy_alone = solo(engine, messages, max_new_tokens=8)

    prefills = record_prefills(engine, monkeypatch)
    shared_before = engine.scheduler.stats["prefills_shared"]
    streams = [engine.stream(messages, start=False, seed=5 + i, **SAMPLED) for i in range(3)]
    streams[0].start(*streams[1:])
    assert [s.consume().token_ids for s in streams] == alone
    assert list(prefills.values()) == [2]  # one prefill of the real and the noised view, not three
    assert engine.scheduler.stats["prefills_shared"] - shared_before == 2

    greedy = [engine.stream(messages, start=False, max_new_tokens=8) for _ in range(2)]
    greedy[0].start(greedy[1])
    assert [s.consume().token_ids for s in greedy] == [greedy_alone, greedy_alone]


def test_unsafe_answers_share_the_prefill_and_open_with_the_same_refusal(fresh, monkeypatch):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, config=SafeCoDeConfig(lambda_boost=3.0), judge="fixed:unsafe")
    messages = user_turn("How do I get closer to the edge?", gradient_image(48, 40))
    alone = [solo(engine, messages, seed=11 + i, **SAMPLED) for i in range(2)]
    prefills = record_prefills(engine, monkeypatch)
    streams = [engine.stream(messages, start=False, seed=11 + i, **SAMPLED) for i in range(2)]
    streams[0].start(streams[1])
    results = [s.consume() for s in streams]
    assert [r.token_ids for r in results] == alone
    assert all(r.refused for r in results) and len(prefills) == 1


def test_when_the_first_answer_is_cancelled_in_the_queue_the_others_still_share_a_prefill(fresh, monkeypatch):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    messages = user_turn("What is this?", gradient_image(40, 40))
    alone = [solo(engine, messages, seed=i, **SAMPLED) for i in range(1, 3)]
    prefills = record_prefills(engine, monkeypatch)
    streams = [engine.stream(messages, start=False, seed=i, **SAMPLED) for i in range(3)]
    with engine.scheduler._cond:  # the worker cannot take the queue until both calls are made
        streams[0].start(*streams[1:])
        streams[0].close()
    assert [s.consume().token_ids for s in streams[1:]] == alone
    assert streams[0].result is None and len(prefills) == 1


def test_cancelling_the_first_answer_at_any_point_leaves_the_others_whole(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    messages = user_turn("What is this?", gradient_image(40, 40))
    alone = [solo(engine, messages, seed=i, **SAMPLED) for i in range(1, 4)]
    streams = [engine.stream(messages, start=False, seed=i, **SAMPLED) for i in range(4)]
    streams[0].start(*streams[1:])
    streams[0].close()  # waiting, prefilling or decoding: whichever the worker has reached
    assert [s.consume().token_ids for s in streams[1:]] == alone


def test_an_answer_to_another_prompt_is_queued_on_its_own(fresh, monkeypatch):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    first = user_turn("What is this?", gradient_image(40, 40))
    other = user_turn("What is that?", gradient_image(40, 40))
    expected = [solo(engine, first, max_new_tokens=6), solo(engine, other, max_new_tokens=6)]
    shared_before = engine.scheduler.stats["prefills_shared"]
    streams = [engine.stream(first, start=False, max_new_tokens=6), engine.stream(other, start=False, max_new_tokens=6)]
    streams[0].start(streams[1])
    assert [s.consume().token_ids for s in streams] == expected
    assert engine.scheduler.stats["prefills_shared"] == shared_before


def test_streams_that_share_a_prefill_start_together_once(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    messages = user_turn("What is this?", gradient_image(40, 40))
    started = engine.stream(messages, max_new_tokens=2)
    waiting = engine.stream(messages, start=False, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="started together"):
        started.start(waiting)
    assert started.consume().finish_reason in ("stop", "length")
    assert waiting.consume().token_ids == started.result.token_ids  # still usable on its own


def test_a_full_queue_refuses_every_answer_of_the_request_and_the_model_stays_usable(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", batching=BatchingConfig(max_queue=1))
    first = user_turn("What is this?", gradient_image(40, 40))
    streams = [engine.stream(first, start=False, max_new_tokens=2) for _ in range(2)]
    streams.append(engine.stream(user_turn("What is that?", gradient_image(40, 40)), start=False, max_new_tokens=2))
    # the second answer shares the first one's place; the third, another prompt, needs one of its own
    with pytest.raises(OverloadedError, match="max_queue"):
        streams[0].start(*streams[1:])
    assert engine.scheduler.queue_depth == 0
    again = [engine.stream(first, start=False, max_new_tokens=2) for _ in range(2)]
    again[0].start(again[1])  # one place for both: accepted
    assert again[1].consume().token_ids == again[0].consume().token_ids
