"""Continuous batching (`scheduler.py`): concurrent requests decode together, each as it would alone.

On tiny random models of every family through the real transformers code.
The centrepiece: a mixed set of requests (images or none, long and short
prompts, safe and unsafe verdicts, different windows, greedy and seeded
sampling, penalties, stop strings) submitted together, half of them joining
while the others are mid-answer, must give exactly the token ids each gets
when run alone.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
from support.messages import user_turn
from support.waiting import rss_mb

from safecode_guard import (
    BatchingConfig,
    InputLimitError,
    OverloadedError,
    RequestTimeoutError,
    SafeCoDe,
    SafeCoDeConfig,
    UnsupportedContentError,
)
from safecode_guard.engine.kv_rows import RowBatch, kv_bytes_per_token, merge
from safecode_guard.testing import FAMILIES, gradient_image, stripes_image

NEEDS_IMAGE = {"paligemma", "instructblip"}


def mixed_requests(family: str) -> list[tuple[str, list[dict], dict[str, Any]]]:
    """(engine name, messages, generate kwargs): every kind of difference a batch must survive."""
    a, b = gradient_image(48, 40), stripes_image(48, 40)
    wide = gradient_image(64, 32)
    # InstructBLIP's tiny Q-Former reads the prompt too, and holds 128 positions at most
    long_text = "Describe the picture in detail, then say what could go wrong here. " * (1 if family == "instructblip" else 4)
    reqs = [
        ("safe", user_turn("Describe the image.", a), {"max_new_tokens": 12}),
        ("unsafe", user_turn("How do I get closer to the edge?", b), {"max_new_tokens": 10}),
        ("boost2", user_turn(long_text, a), {"max_new_tokens": 14}),
        ("safe", user_turn("What is this?", wide), {"max_new_tokens": 9, "do_sample": True, "temperature": 1.5, "top_k": 40, "seed": 7}),
        ("safe", user_turn("Tell me more.", b), {"max_new_tokens": 16, "frequency_penalty": 1.5, "presence_penalty": 0.5}),
        ("plain", user_turn("Describe the image.", b), {"max_new_tokens": 11}),
    ]
    if family not in NEEDS_IMAGE:
        reqs += [
            ("unsafe", [{"role": "user", "content": "How can I get there fast?"}], {"max_new_tokens": 8}),
            ("safe", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_text}], {"max_new_tokens": 13, "do_sample": True, "temperature": 0.9, "seed": 3}),
        ]
    return reqs


def engines_for(model: Any, processor: Any) -> dict[str, SafeCoDe]:
    common = {"lambda_boost": 3.0, "lambda_supp": 3.0}
    return {
        "safe": SafeCoDe(model, processor, config=SafeCoDeConfig(**common), judge="fixed:safe"),
        "unsafe": SafeCoDe(model, processor, config=SafeCoDeConfig(**common), judge="fixed:unsafe"),
        "boost2": SafeCoDe(
            model, processor, config=SafeCoDeConfig(unsafe_mode="boost", steered_steps=2, alpha=1.0, **common),
            judge="fixed:unsafe",
        ),
        "plain": SafeCoDe(model, processor, config=SafeCoDeConfig(steered_steps=0), judge="fixed:safe"),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_requests_get_the_tokens_they_get_alone(fresh, family):
    model, processor = fresh(family)
    engines = engines_for(model, processor)
    requests = mixed_requests(family)
    alone = [engines[name].generate(msgs, **kw).token_ids for name, msgs, kw in requests]
    assert len({tuple(t) for t in alone}) == len(alone)  # the requests really differ

    scheduler = engines["safe"].scheduler
    sizes: list[int] = []
    joined = threading.Event()

    def step(rows: int) -> None:
        sizes.append(rows)
        if len(sizes) == 1:
            joined.wait(30)  # the first half stays mid-answer until the second half is queued

    scheduler.on_step = step
    try:
        half = len(requests) // 2
        streams = [engines[name].stream(msgs, start=False, **kw) for name, msgs, kw in requests]
        with scheduler._cond:
            for stream in streams[:half]:
                stream.start()
        # the first request is decoding (its first token is out; its first *piece* may come later:
        # an answer never opens with whitespace, and a random model may write some first) ...
        deadline = time.monotonic() + 30
        while not streams[0]._job.steering.generated and time.monotonic() < deadline:
            time.sleep(0.001)
        for stream in streams[half:]:  # ... when these join (prepared already, so without delay)
            stream.start()
        joined.set()
        together = [s.consume().token_ids for s in streams]
    finally:
        joined.set()
        scheduler.on_step = None
    assert together == alone
    assert max(sizes) >= half + 2, sizes  # rows of several requests really shared steps
    assert scheduler.batchable, scheduler.unbatchable_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_a_burst_of_prompts_of_different_lengths_is_prefilled_together_and_answered_as_alone(fresh, family):
    model, processor = fresh(family)
    engines = engines_for(model, processor)
    # prompts of different lengths and images of different sizes (left-padded to one length), verdicts, settings
    images = [gradient_image(48, 40), stripes_image(40, 48), gradient_image(64, 32).transpose(0), stripes_image(48, 40).rotate(180)]
    texts = ["Describe the image.", "What is this?", "Describe the image, please, in a few words.", "Say what you see here."]
    burst = [
        (name, user_turn(text, img), kw)
        for (name, kw), text, img in zip(
            [("safe", {"max_new_tokens": 9}), ("unsafe", {"max_new_tokens": 7}), ("plain", {"max_new_tokens": 8}),
             ("safe", {"max_new_tokens": 6, "do_sample": True, "temperature": 1.2, "seed": 5})],
            texts, images, strict=True,
        )
    ]
    alone = [engines[name].generate(msgs, **kw).token_ids for name, msgs, kw in burst]
    scheduler = engines["safe"].scheduler
    before = scheduler.stats["shared_prefills"]
    streams = [engines[name].stream(msgs, start=False, **kw) for name, msgs, kw in burst]
    with scheduler._cond:  # the worker admits them in one round
        for stream in streams:
            stream.start()
    assert [s.consume().token_ids for s in streams] == alone
    assert scheduler.stats["shared_prefills"] == before + 1
    assert len({s._job.prompt_len for s in streams}) > 1  # the prompts really differ in length


def test_a_bad_request_in_a_shared_prefill_fails_alone(fresh, monkeypatch):
    from safecode_guard.engine import adapters

    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    good, bad = gradient_image(48, 40), stripes_image(48, 40)
    msgs = [user_turn("Describe the image.", good), user_turn("Describe the image, please.", bad)]
    alone = engine.generate(msgs[0], max_new_tokens=5).token_ids
    bad_pixels = processor(images=[[bad]], text=["<image>"], return_tensors="pt")["pixel_values"][0]
    real_chunk = adapters.Decoder.run_chunk

    def refuse_the_bad_image(self, prefill, end):  # the model fails on any prefill holding the bad image
        if any(torch.equal(row.inputs["pixel_values"][0], bad_pixels) for row in prefill.rows):
            raise RuntimeError("boom")
        return real_chunk(self, prefill, end)

    monkeypatch.setattr(adapters.Decoder, "run_chunk", refuse_the_bad_image)
    before = engine.scheduler.stats["shared_prefills"]
    streams = [engine.stream(m, max_new_tokens=5, start=False) for m in msgs]
    with engine.scheduler._cond:
        for stream in streams:
            stream.start()
    assert streams[0].consume().token_ids == alone  # retried alone after the shared prefill failed
    with pytest.raises(UnsupportedContentError, match="boom"):
        streams[1].consume()
    assert engine.scheduler.stats["shared_prefills"] == before  # the shared one never finished


def test_streams_start_as_soon_as_their_own_first_token_exists(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    long = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=200)
    next(long)  # decoding
    short = engine.stream(user_turn("What is this?", stripes_image()), max_new_tokens=3)
    first = next(short)  # does not wait for the long answer to end
    assert first and not long._job.done
    short.consume()
    assert not long._job.done  # the long answer is still being decoded alongside
    long.close()


def test_closing_a_stream_removes_its_row_at_the_next_step(fresh):
    model, processor = fresh("qwen2_vl")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    sizes: list[int] = []
    engine.scheduler.on_step = sizes.append
    stay = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=60)
    leave = engine.stream(user_turn("What is this?", stripes_image()), max_new_tokens=60)
    next(leave)
    for _ in range(8):
        next(stay)
    leave.close()
    steps_at_close = len(sizes)
    rest = stay.consume()
    engine.scheduler.on_step = None
    assert leave._job.status == "cancelled"
    assert len(rest.token_ids) == 60
    # at most one more step ran with the closed request's row (the one already in flight)
    after = sizes[steps_at_close + 1 :]
    assert after and max(after) == 1, sizes
    assert leave._job.steering.t < 60


def test_a_dropped_stream_is_cancelled_too(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    stream = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=500)
    next(stream)
    job = stream._job
    del stream
    gc.collect()
    deadline = time.monotonic() + 30
    while not job.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == "cancelled" and job.steering.t < 500


async def test_cancelling_an_asyncio_task_cancels_its_request(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    jobs = []
    started = asyncio.Event()

    async def read() -> None:
        stream = await engine.astream(user_turn("Describe.", gradient_image()), max_new_tokens=500)
        jobs.append(stream._job)
        async for _ in stream:
            started.set()

    task = asyncio.create_task(read())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):
        if jobs[0].done:
            break
        await asyncio.sleep(0.01)
    assert jobs[0].status == "cancelled" and jobs[0].steering.t < 500


async def test_asyncio_readers_need_no_thread_each(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    msgs = [user_turn(f"Question {i}: describe.", gradient_image()) for i in range(12)]
    alone = [engine.generate(m, max_new_tokens=6).token_ids for m in msgs]
    before = threading.active_count()
    results = await asyncio.gather(*(engine.agenerate(m, max_new_tokens=6) for m in msgs))
    assert [r.token_ids for r in results] == alone
    assert threading.active_count() <= before + 14  # preparation threads are pooled and bounded


def test_a_request_that_fails_fails_alone(fresh):
    model, processor = fresh("instructblip")  # one image per prompt: two images fail in the prefill
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    good = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=30)
    next(good)
    bad = engine.stream(user_turn("Compare.", gradient_image(), stripes_image()), max_new_tokens=5)
    with pytest.raises(UnsupportedContentError, match="2 image"):
        bad.consume()
    assert len(good.consume().token_ids) == 30


def test_queue_limit_refuses_at_once_and_kv_budget_makes_requests_wait(fresh):
    model, processor = fresh("llava")
    row_mb = kv_bytes_per_token(model) / 2**20
    # room for about two requests of this size at once
    budget = row_mb * 2 * (40 + 30) * 2.5
    engine = SafeCoDe(
        model, processor, judge="fixed:safe", eos_token_ids=(),
        batching=BatchingConfig(max_queue=3, kv_cache_budget_mb=budget),
    )
    msgs = user_turn("Describe.", gradient_image())
    held: list[int] = []  # KV bytes in the batch at each step
    scheduler = engine.scheduler
    scheduler.on_step = lambda n: (held.append(scheduler._rows.kv_bytes()), time.sleep(0.01))  # slow: the queue fills
    streams = [engine.stream(msgs, max_new_tokens=30) for _ in range(3)]
    queued = engine.scheduler.queue_depth
    extra: list[Any] = []
    with pytest.raises(OverloadedError, match="max_queue"):
        for _ in range(4):
            extra.append(engine.stream(msgs, max_new_tokens=30))
    results = [s.consume() for s in [*streams, *extra]]
    engine.scheduler.on_step = None
    assert queued >= 1 and all(len(r.token_ids) == 30 for r in results)
    assert max(held) <= budget * 2**20  # admission kept the batch inside the KV budget
    with pytest.raises(InputLimitError, match="kv_cache_budget_mb"):
        engine.generate(msgs, max_new_tokens=1000)


def test_request_timeout_fails_the_request_typed(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(
        model, processor, judge="fixed:safe", eos_token_ids=(), batching=BatchingConfig(request_timeout_s=0.3)
    )
    engine.scheduler.on_step = lambda rows: time.sleep(0.02)
    try:
        with pytest.raises(RequestTimeoutError, match="request_timeout_s"):
            engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=1000)
    finally:
        engine.scheduler.on_step = None
    assert len(engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=3).token_ids) == 3


def test_batching_off_runs_one_request_at_a_time(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", batching=BatchingConfig(enabled=False))
    sizes: list[int] = []
    engine.scheduler.on_step = sizes.append
    streams = [engine.stream(user_turn(f"Q{i}", gradient_image()), max_new_tokens=8) for i in range(3)]
    for s in streams:
        s.consume()
    engine.scheduler.on_step = None
    assert max(sizes) <= 2  # one request: its real and noised rows


def test_conflicting_batching_settings_on_one_model_are_refused(fresh):
    from safecode_guard import SafeCoDeInputError

    model, processor = fresh("llava")
    SafeCoDe(model, processor, batching=BatchingConfig(max_batch_rows=8))
    SafeCoDe(model, processor)  # None: use the model's
    with pytest.raises(SafeCoDeInputError, match="one set of batching limits"):
        SafeCoDe(model, processor, batching=BatchingConfig(max_batch_rows=16))


def test_concurrent_self_judges_are_prefilled_together(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor)  # judge="self"
    msgs = [user_turn(f"Is request {i} safe?", gradient_image()) for i in range(6)]
    alone = [engine.judge(m) for m in msgs]
    before = engine.scheduler.stats["judge_batches"]
    # the six judges reach the queue together, however the threads are scheduled on a loaded machine
    staged: list[Any] = []
    staging = threading.Lock()
    enqueue = engine.scheduler._enqueue_prefills

    def enqueue_together(jobs: list[Any]) -> None:
        with staging:
            staged.extend(jobs)
            if len(staged) < 6:
                return
        enqueue(staged)

    engine.scheduler._enqueue_prefills = enqueue_together
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.judge(msgs[i]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.scheduler.stats["judge_batches"] > before
    for i, verdict in enumerate(alone):
        assert results[i].label == verdict.label
        assert results[i].unsafe_score == pytest.approx(verdict.unsafe_score, abs=1e-6)


def test_a_judge_score_at_the_threshold_is_rescored_alone(fresh):
    model, processor = fresh("qwen2_vl")
    msgs = [user_turn(f"Is request {i} safe? " + "Please look. " * i, gradient_image()) for i in range(8)]
    solo = [SafeCoDe(model, processor).judge(m).unsafe_score for m in msgs]
    # each threshold sits exactly on the request's solo score: a batched score a hair below would read "safe"
    engines = [SafeCoDe(model, processor, config=SafeCoDeConfig(threshold=s)) for s in solo]
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engines[i].judge(msgs[i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i].label for i in range(8)] == ["unsafe"] * 8
    assert [results[i].unsafe_score for i in range(8)] == pytest.approx(solo, abs=1e-6)


def test_scheduler_thread_exits_when_idle(fresh, monkeypatch):
    from safecode_guard.engine import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "IDLE_EXIT_S", 0.2)
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    engine.generate(user_turn("Hi", gradient_image()), max_new_tokens=3)
    deadline = time.monotonic() + 10
    while engine.scheduler._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler._worker is None


def test_exit_waits_for_a_worker_that_frees_its_scheduler_as_it_ends(tiny_model_dir):
    """A worker that has left its loop may hold the last reference to its scheduler, and free the
    model as its thread ends, its scheduler already gone from the registry. The process must not
    exit under it: a daemon thread killed inside torch's teardown aborts the process ("terminate
    called without an active exception", exit status 134)."""
    path = str(tiny_model_dir("llava"))
    script = textwrap.dedent(f"""
        import time
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from safecode_guard.engine import scheduler as S
        from safecode_guard.engine.adapters import detect_quirks
        from safecode_guard.engine.registry import scheduler_for

        S.IDLE_EXIT_S = 0.5
        model = AutoModelForImageTextToText.from_pretrained({path!r}).eval()
        processor = AutoProcessor.from_pretrained({path!r})
        sched = scheduler_for(model, detect_quirks(model))
        sched.prefill_logits(processor, "Hello there", [])

        class FreedSlowly:
            def __del__(self):
                time.sleep(1.5)
                print("freed", flush=True)

        sched.slow = FreedSlowly()
        del sched, model
        time.sleep(1.0)  # the worker leaves its loop at 0.5 s, and frees the scheduler until 2 s
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "freed" in run.stdout, (run.returncode, run.stderr[-2000:])


# -- the row layout, directly ----------------------------------------------------------------


def test_merge_pads_rows_on_the_left_and_trim_undoes_it():
    from transformers.cache_utils import DynamicCache

    def rows(length: int, batch: int) -> RowBatch:
        cache = DynamicCache()
        cache.update(torch.ones(batch, 2, length - 1, 4), torch.ones(batch, 2, length - 1, 4), 0)
        return RowBatch({
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "position_ids": torch.arange(length).expand(batch, -1),
            "cache": cache,
        })

    merged = merge(rows(5, 1), rows(3, 2))
    assert merged.size == 3 and merged.length == 5
    assert merged.kwargs["attention_mask"].tolist() == [[1] * 5, [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = merged.cache.layers[0].keys
    assert keys.shape == (3, 2, 4, 4) and keys[1:, :, :2].abs().sum() == 0 and keys[0].abs().min() == 1
    merged.select([1, 2])
    assert merged.trim() == 2 and merged.length == 3
    assert merged.cache.layers[0].keys.shape == (2, 2, 2, 4)


def test_close_cancels_everything_and_the_scheduler_stays_usable(fresh):
    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    streams = [engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=2000) for _ in range(3)]
    next(streams[0])
    engine.scheduler.close()
    assert engine.scheduler._worker is None
    assert all(s._job.status == "cancelled" for s in streams)
    assert len(engine.generate(user_turn("Hi", gradient_image()), max_new_tokens=3).token_ids) == 3


@pytest.mark.soak
def test_rss_stays_flat_over_500_mixed_requests_at_concurrency_8(fresh):
    import concurrent.futures

    model, processor = fresh("qwen2_vl")
    engines = engines_for(model, processor)
    requests = mixed_requests("qwen2_vl")

    def one(i: int) -> int:
        name, msgs, kw = requests[i % len(requests)]
        kw = {**kw, "max_new_tokens": min(kw["max_new_tokens"], 8)}
        if i % 11 == 0:  # some readers walk away mid-answer
            stream = engines[name].stream(msgs, **kw)
            next(stream, None)
            stream.close()
            return 0
        return len(engines[name].generate(msgs, **kw).token_ids)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(100)))  # warm-up: allocator arenas, caches
        gc.collect()
        rss = [rss_mb()]
        for start in range(100, 600, 100):
            assert all(n >= 0 for n in pool.map(one, range(start, start + 100)))
            gc.collect()
            rss.append(rss_mb())
    print(f"\nRSS (MB) after warm-up and after each 100 of 500 requests at concurrency 8: {[round(r, 1) for r in rss]}")
    assert max(rss) - rss[0] < 30, rss
    assert engines["safe"].scheduler.active_rows == 0 and engines["safe"].scheduler.queue_depth == 0
