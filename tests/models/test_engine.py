"""The decoding engine (`SafeCoDe`) on the tiny Llava, through real transformers code: verdict
modulation, refusal prefixes, streaming, sampling and seeds, penalties, stops, usage, limits
checked before any model work, a shared scheduler and streams read from threads.

Every family against the reference implementation is in tests/models/test_family_adapters.py.
"""

from __future__ import annotations

import copy
import time

import pytest
from support.messages import user_turn

from safecode_guard import SafeCoDe, SafeCoDeConfig, Verdict
from safecode_guard.testing import gradient_image, stripes_image

# -- behaviour ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava(loaded):
    return loaded("llava")


def test_unsafe_prefix_opens_with_a_refusal_and_changes_the_answer(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:unsafe")
    plain = engine.baseline(msgs, max_new_tokens=10)
    steered = engine.generate(msgs, max_new_tokens=10)
    assert steered.refused and not plain.refused
    assert steered.token_ids != plain.token_ids
    assert steered.verdict.label == "unsafe" and steered.verdict.source == "judge"


def test_safe_verdict_suppresses_a_refusal_the_model_would_start(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    tok = processor.tokenizer
    plain = SafeCoDe(model, processor, judge="fixed:safe").baseline(msgs, max_new_tokens=4)
    first = tok.decode(plain.token_ids[:1])
    # make the model's own first token the start of a "refusal" phrase
    cfg = SafeCoDeConfig(refusal_phrases=[first], lambda_supp=100.0, alpha=0.0)
    steered = SafeCoDe(model, processor, config=cfg, judge="fixed:safe").generate(msgs, max_new_tokens=4)
    assert steered.token_ids[0] != plain.token_ids[0]
    unsafe = SafeCoDe(model, processor, config=cfg.model_copy(update={"unsafe_mode": "boost"}), judge="fixed:unsafe")
    assert unsafe.generate(msgs, max_new_tokens=4).token_ids[0] == plain.token_ids[0]


def test_contrast_changes_tokens_and_zero_alpha_without_modulation_is_plain(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    off = SafeCoDeConfig(alpha=0.0, lambda_supp=0.0)
    engine = SafeCoDe(model, processor, config=off, judge="fixed:safe")
    assert engine.generate(msgs, max_new_tokens=12).token_ids == engine.baseline(msgs, max_new_tokens=12).token_ids
    strong = SafeCoDe(model, processor, config=SafeCoDeConfig(alpha=5.0, lambda_supp=0.0), judge="fixed:safe")
    assert strong.generate(msgs, max_new_tokens=12).token_ids != engine.baseline(msgs, max_new_tokens=12).token_ids


def test_text_only_request_still_gets_the_verdict_modulation(llava):
    model, processor = llava
    msgs = [{"role": "user", "content": "How do I get there?"}]
    result = SafeCoDe(model, processor, judge="fixed:unsafe").generate(msgs, max_new_tokens=8)
    assert result.refused and result.verdict.label == "unsafe"
    plain = SafeCoDe(model, processor, judge="fixed:unsafe").baseline(msgs, max_new_tokens=8)
    assert not plain.refused and plain.verdict is None


def test_stream_equals_generate_greedy_and_sampled(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    for kwargs in ({}, {"do_sample": True, "temperature": 1.3, "top_k": 50, "top_p": 0.95, "seed": 11}):
        stream = engine.stream(msgs, max_new_tokens=16, **kwargs)
        assert stream.verdict is not None and stream.verdict.label == "safe"  # known before any text
        pieces = list(stream)
        result = engine.generate(msgs, max_new_tokens=16, **kwargs)
        assert "".join(pieces) == result.text == stream.result.text
        assert stream.result.token_ids == result.token_ids
        assert len([p for p in pieces if p]) > 1  # really incremental


def test_same_seed_same_answer_other_seed_other_answer(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    kw = {"do_sample": True, "temperature": 2.0, "max_new_tokens": 16}
    a = engine.generate(msgs, seed=5, **kw).token_ids
    assert a == engine.generate(msgs, seed=5, **kw).token_ids
    assert a != engine.generate(msgs, seed=6, **kw).token_ids


def test_sampling_without_a_seed_draws_fresh_randomness(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    answers = {tuple(engine.generate(msgs, do_sample=True, temperature=2.0, max_new_tokens=12).token_ids) for _ in range(4)}
    assert len(answers) > 1  # the old default (seed 0 every call) gave one answer four times


def test_penalties_and_logit_bias_change_decoding(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    plain = engine.generate(msgs, max_new_tokens=24).token_ids
    assert len(set(plain)) < len(plain)  # greedy repeats itself on this model
    spread = engine.generate(msgs, max_new_tokens=24, frequency_penalty=2.0, presence_penalty=2.0).token_ids
    assert len(set(spread)) > len(set(plain))
    banned = engine.generate(msgs, max_new_tokens=24, logit_bias={plain[0]: -100, str(plain[1]): -100}).token_ids
    assert plain[0] not in banned and plain[1] not in banned
    forced = engine.generate(msgs, max_new_tokens=3, logit_bias={plain[5]: 100}).token_ids
    assert forced[1:] == [plain[5], plain[5]]  # the window's first token is steered, later ones biased
    # the forced refusal opening of an unsafe verdict ignores the bias
    unsafe = engine.generate(msgs, max_new_tokens=6, verdict="unsafe", logit_bias={plain[5]: 100})
    assert unsafe.refused


def test_stop_string_cuts_the_answer(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    full = engine.generate(msgs, max_new_tokens=20)
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = engine.generate(msgs, max_new_tokens=20, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in "".join(engine.stream(msgs, max_new_tokens=20, stop=[stop]))
    assert len(cut.token_ids) < 20


def test_eos_ends_generation(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    full = SafeCoDe(model, processor, judge="fixed:safe").generate(msgs, max_new_tokens=12)
    eos_candidate = full.token_ids[5]
    stop_at = full.token_ids.index(eos_candidate)
    patched = copy.deepcopy(model)
    patched.generation_config.eos_token_id = [eos_candidate]
    result = SafeCoDe(patched, processor, judge="fixed:safe").generate(msgs, max_new_tokens=12)
    assert result.finish_reason == "stop"
    assert result.token_ids == full.token_ids[: stop_at + 1]


def test_usage_timings_and_override(llava):
    model, processor = llava
    msgs = user_turn("Describe the image.", gradient_image())
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    result = engine.generate(msgs, max_new_tokens=7, verdict="unsafe")
    assert result.verdict.label == "unsafe" and result.verdict.source == "override"
    assert result.usage.completion_tokens == len(result.token_ids) <= 7
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert result.usage.prompt_tokens == processor(images=[gradient_image()], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert set(result.timings) == {"judge_s", "queue_s", "prefill_s", "decode_s", "total_s"}
    custom = Verdict(label="safe", unsafe_score=0.1, judge="mine")
    assert engine.generate(msgs, max_new_tokens=2, verdict=custom).verdict.judge == "mine"
    with pytest.raises(ValueError, match="verdict"):
        engine.generate(msgs, verdict="maybe")
    # a forged Verdict (pydantic does not validate model_construct / model_copy) is refused, typed
    from safecode_guard import InvalidVerdictError

    for forged in (
        Verdict.model_construct(label="UNSAFE", judge="mine", source="judge"),
        custom.model_copy(update={"unsafe_score": float("nan")}),
        {"label": "safe", "unsafe_score": -1.0},
    ):
        with pytest.raises(InvalidVerdictError):
            engine.generate(msgs, max_new_tokens=2, verdict=forged)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 10**9}, "max_new_tokens"),
        ({"temperature": 0.0, "do_sample": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": [3]}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": "high"}, "frequency_penalty"),
        ({"logit_bias": {10**9: 1}}, "token id"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": [5]}, "logit_bias"),
        ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300"),
    ],
)
def test_bad_generation_settings_are_typed_errors_and_the_engine_stays_usable(llava, kwargs, match):
    model, processor = llava
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=match):
        engine.generate(msgs, **kwargs)
    assert engine.generate(msgs, max_new_tokens=2).usage.completion_tokens >= 1


def test_prompt_longer_than_context_is_refused(llava):
    model, processor = llava
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    limit = engine.context_length
    assert limit is not None
    with pytest.raises(ValueError, match="context"):
        engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=min(limit, engine.policy.max_new_tokens_limit))


def test_noised_row_leaves_the_cache_after_the_window(llava):
    model, processor = llava
    engine = SafeCoDe(model, processor, config=SafeCoDeConfig(steered_steps=3), judge="fixed:safe")
    seen: list[int] = []
    engine.scheduler.on_step = seen.append
    try:
        engine.generate(user_turn("Describe the image.", gradient_image()), max_new_tokens=8)
    finally:
        engine.scheduler.on_step = None
    # steps 1..2 feed both rows; from step 3 on only the real row (no re-prefill)
    assert seen == [2, 2, 1, 1, 1, 1, 1]


def test_judge_method_and_self_judge_scores(llava):
    model, processor = llava
    engine = SafeCoDe(model, processor)  # judge="self" by default
    verdict = engine.judge(user_turn("Is this safe?", gradient_image()))
    assert verdict.judge.startswith("self") and verdict.source == "judge"
    assert verdict.unsafe_score is not None and 0.0 <= verdict.unsafe_score <= 1.0
    assert verdict.label == ("unsafe" if verdict.unsafe_score >= 0.5 else "safe")


def test_engines_on_one_model_share_a_scheduler_and_queueing_is_not_a_judge_timeout(llava):
    import threading

    model, processor = llava
    cfg = SafeCoDeConfig(judge_timeout_s=0.05)
    first, second = SafeCoDe(model, processor, config=cfg), SafeCoDe(model, processor, config=cfg)
    assert first.scheduler is second.scheduler
    busy = threading.Event()
    first.scheduler.on_step = lambda rows: (busy.set(), time.sleep(0.01))  # decode steps slower than the timeout
    try:
        long_answer = threading.Thread(
            target=lambda: first.generate(user_turn("Describe.", gradient_image()), max_new_tokens=40, verdict="safe")
        )
        long_answer.start()
        busy.wait(10)
        verdict = second.judge(user_turn("Is this safe?", gradient_image()))
        long_answer.join()
    finally:
        first.scheduler.on_step = None
    assert verdict.source == "judge" and verdict.error is None


# -- limits before any model work, bounded stop strings, no lock across a yield ---------


def test_every_length_limit_is_checked_before_the_judge(llava):
    from safecode_guard import InputLimitError, InputPolicy

    model, processor = llava
    calls: list[object] = []

    def judge(request):
        calls.append(request)
        return "safe"

    long_text = "word " * 5000
    engine = SafeCoDe(model, processor, judge=judge, policy=InputPolicy(max_prompt_tokens=64))
    with pytest.raises(InputLimitError, match="max_prompt_tokens"):
        engine.generate([{"role": "user", "content": long_text}], max_new_tokens=4)
    unlimited = SafeCoDe(model, processor, judge=judge)
    with pytest.raises(InputLimitError, match="context"):
        unlimited.generate([{"role": "user", "content": long_text}], max_new_tokens=4)
    with pytest.raises(InputLimitError, match="stop"):
        unlimited.generate([{"role": "user", "content": "hi"}], stop=["x" * 300])
    assert calls == []  # the judge (which may be a forward pass) never ran
    self_judged = SafeCoDe(model, processor, judge="self", policy=InputPolicy(max_prompt_tokens=64))
    seen: list[int] = []
    self_judged.scheduler.on_step = seen.append
    try:
        with pytest.raises(InputLimitError):
            self_judged.generate([{"role": "user", "content": long_text}], max_new_tokens=4)
    finally:
        self_judged.scheduler.on_step = None
    assert self_judged.scheduler.stats["judge_batches"] == 0 and seen == []


def test_stop_strings_are_bounded_in_number_and_length(llava):
    from safecode_guard import InputLimitError
    from safecode_guard.engine.decoding import MAX_STOP_CHARS, MAX_STOP_STRINGS

    model, processor = llava
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(InputLimitError, match=f"at most {MAX_STOP_STRINGS}"):
        engine.generate(msgs, stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(InputLimitError, match=f"at most {MAX_STOP_CHARS}"):
        engine.generate(msgs, stop=["y" * (MAX_STOP_CHARS + 1)])
    full = engine.generate(msgs, max_new_tokens=20)
    stops = ["z" * MAX_STOP_CHARS] * (MAX_STOP_STRINGS - 1) + [full.text[4:7]]
    cut = engine.generate(msgs, max_new_tokens=20, stop=stops)
    assert cut.text == full.text[: full.text.index(full.text[4:7])]


def test_a_stream_read_from_two_threads_holds_nothing_and_a_paused_reader_blocks_no_one(llava):
    import threading

    model, processor = llava
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    msgs = user_turn("Describe the image.", gradient_image())
    alone = engine.generate(msgs, max_new_tokens=12).text
    stream = engine.stream(msgs, max_new_tokens=12)
    first = next(stream)  # read on this thread ...
    rest: list[str] = []
    reader = threading.Thread(target=lambda: rest.extend(stream))  # ... the rest on another
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and first + "".join(rest) == alone
    paused = engine.stream(msgs, max_new_tokens=200)
    next(paused)  # a reader that stops reading ...
    other = engine.generate(user_turn("What is this?", stripes_image()), max_new_tokens=6)
    assert len(other.token_ids) == 6  # ... holds up nobody
    paused.close()
