"""One request's deadline and cancellation (`control.RequestControl`) through every place a request waits.

On a tiny real Llava: preparation, the
judge (a slow callable judge in its thread, the self judge's prefill queued in
the scheduler), the queue, prefill and decoding. A deadline or a cancellation
is never turned into a fallback verdict. The control alone is in tests/unit/test_request_control.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from support.messages import user_turn
from support.waiting import wait_until

from safecode_guard import (
    BatchingConfig,
    RequestCancelledError,
    RequestControl,
    RequestTimeoutError,
    SafeCoDe,
    SafeCoDeConfig,
)
from safecode_guard.engine.jobs import PrefillJob
from safecode_guard.errors import StreamReaderError
from safecode_guard.testing import gradient_image


class SlowJudge:
    """A judge that takes `seconds` (e.g. a remote chat judge) and records that it ran."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls, self.finished = seconds, 0, threading.Event()

    def __call__(self, request: Any) -> str:
        self.calls += 1
        time.sleep(self.seconds)
        self.finished.set()
        return "safe"


# --------------------------------------------------------------------------- through the engine


def test_a_deadline_inside_a_slow_judge_raises_instead_of_falling_back(fresh):
    model, processor = fresh()
    judge = SlowJudge(3.0)
    engine = SafeCoDe(model, processor, judge=judge, config=SafeCoDeConfig(on_judge_error="safe"))
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match=r"timeout_s=0\.4"):
        engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=3, timeout_s=0.4)
    assert time.perf_counter() - start < 2.5  # not the judge's 3 s
    with pytest.raises(RequestTimeoutError):
        engine.judge(user_turn("Describe."), timeout_s=0.3)
    assert engine.scheduler.stats["finished_length"] == 0  # nothing was decoded for them


def test_request_timeout_s_covers_the_judge(fresh):
    model, processor = fresh()
    judge = SlowJudge(3.0)
    engine = SafeCoDe(model, processor, judge=judge, batching=BatchingConfig(request_timeout_s=0.5))
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError, match="request_timeout_s=0.5"):
        engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=3)
    assert time.perf_counter() - start < 2.5
    # the earlier of the two deadlines wins, and names itself
    with pytest.raises(RequestTimeoutError, match=r"timeout_s=0\.2"):
        engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=3, timeout_s=0.2)


def test_a_cancel_from_another_thread_stops_waiting_for_the_judge(fresh):
    model, processor = fresh()
    judge = SlowJudge(3.0)
    engine = SafeCoDe(model, processor, judge=judge, config=SafeCoDeConfig(judge_timeout_s=None))
    control = RequestControl()
    threading.Timer(0.2, control.cancel).start()
    start = time.perf_counter()
    with pytest.raises(RequestCancelledError):
        engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=3, control=control)
    assert time.perf_counter() - start < 2.5
    assert judge.calls == 1 and not judge.finished.is_set()  # a judge thread cannot be killed: no longer waited for
    assert judge.finished.wait(10)
    time.sleep(0.2)
    assert engine.scheduler.queue_depth == 0 and engine.scheduler.stats["finished_length"] == 0


def test_a_self_judge_prefill_waiting_in_the_queue_is_dropped(fresh):
    """The self judge's prefill waits behind a busy scheduler: past the deadline the request raises,
    and the scheduler drops the queued judge prefill instead of running it."""
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge="self", eos_token_ids=())
    scheduler = engine.scheduler
    gate = threading.Event()
    ran: list[Any] = []
    original = scheduler._begin

    def counting(entries: list[Any]) -> Any:
        ran.extend(e for e in entries if isinstance(e, PrefillJob))  # judge prompts handed to the model
        return original(entries)

    scheduler._begin = counting  # type: ignore[method-assign]
    busy = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=400, verdict="safe")
    next(busy)
    stuck = threading.Event()
    scheduler.on_step = lambda rows: (stuck.set(), gate.wait(10))  # the next step blocks: the judge prefill must wait
    try:
        assert stuck.wait(10)
        start = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            engine.generate(user_turn("Describe this.", gradient_image()), max_new_tokens=3, timeout_s=0.5)
        assert time.perf_counter() - start < 5
    finally:
        scheduler.on_step = None
        gate.set()
    busy.close()
    assert wait_until(lambda: not scheduler._prefills and busy._job.done)
    time.sleep(0.2)
    assert ran == []  # the judge prompt was never prefilled
    scheduler._begin = original  # type: ignore[method-assign]
    assert engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=2).verdict.source == "judge"


def test_a_cancelled_request_leaves_the_queue_at_once(fresh):
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=(), batching=BatchingConfig(max_batch_rows=2))
    scheduler = engine.scheduler
    busy = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=400)  # two rows: the batch is full
    next(busy)
    gate = threading.Event()
    scheduler.on_step = lambda rows: gate.wait(10)
    try:
        control = RequestControl()
        waiting = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=5, control=control)
        assert scheduler.queue_depth == 1
        control.cancel()
        with pytest.raises(RequestCancelledError):
            next(waiting)
        # the place is given back now, though the scheduler is still stuck in its step
        assert wait_until(lambda: scheduler.queue_depth == 0, 0.5) or scheduler.queue_depth == 1
    finally:
        scheduler.on_step = None
        gate.set()
    busy.close()
    assert wait_until(lambda: scheduler.queue_depth == 0)
    assert waiting._job.status == "cancelled" and waiting._job.steering.t == 0


def test_decoding_stops_at_the_next_step_once_cancelled(fresh):
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    control = RequestControl()
    stream = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=1500, control=control)
    next(stream)
    control.cancel()
    with pytest.raises(RequestCancelledError):
        for _ in stream:
            pass
    assert wait_until(lambda: stream._job.done)
    assert stream._job.status == "cancelled" and stream._job.steering.t < 1500


def test_a_deadline_while_decoding_ends_the_reader_and_the_rows(fresh):
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    engine.scheduler.on_step = lambda rows: time.sleep(0.01)
    try:
        with pytest.raises(RequestTimeoutError, match="token"):
            engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=2000, timeout_s=0.5)
    finally:
        engine.scheduler.on_step = None
    assert wait_until(lambda: engine.scheduler.active_rows == 0)


async def test_cancelling_the_task_stops_waiting_for_the_judge(fresh):
    model, processor = fresh()
    judge = SlowJudge(2.0)
    engine = SafeCoDe(model, processor, judge=judge, config=SafeCoDeConfig(judge_timeout_s=None))
    task = asyncio.create_task(engine.agenerate(user_turn("Describe.", gradient_image()), max_new_tokens=3))
    for _ in range(200):
        if judge.calls:
            break
        await asyncio.sleep(0.01)
    assert judge.calls == 1
    start = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.perf_counter() - start < 1.5
    await asyncio.sleep(2.5)  # the judge returns on its own; nothing is queued for the cancelled request
    assert engine.scheduler.queue_depth == 0 and engine.scheduler.stats["finished_length"] == 0


async def test_an_async_deadline_covers_the_judge(fresh):
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge=SlowJudge(2.0))
    start = time.perf_counter()
    with pytest.raises(RequestTimeoutError):
        await engine.agenerate(user_turn("Describe.", gradient_image()), max_new_tokens=3, timeout_s=0.3)
    assert time.perf_counter() - start < 1.8


def test_a_second_reader_of_one_stream_is_refused(fresh):
    model, processor = fresh()
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    gate = threading.Event()
    engine.scheduler.on_step = lambda rows: gate.wait(10)  # no step runs: the first reader must wait
    stream = engine.stream(user_turn("Describe.", gradient_image()), max_new_tokens=50)
    channel = stream._job.channel
    blocked = threading.Event()
    original = channel._cond.wait_for

    def wait_for(predicate: Any, timeout: float | None = None) -> bool:
        if not predicate():
            blocked.set()
        return original(predicate, timeout)

    channel._cond.wait_for = wait_for  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def second() -> None:
        try:
            next(stream)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=lambda: stream.consume())
    try:
        reader.start()
        assert blocked.wait(10)  # the first reader is waiting inside the channel
        other = threading.Thread(target=second)
        other.start()
        other.join(10)
        assert not other.is_alive()  # refused at once, never left waiting
        assert len(errors) == 1 and isinstance(errors[0], StreamReaderError)
    finally:
        engine.scheduler.on_step = None
        gate.set()
    reader.join(30)
    assert not reader.is_alive() and stream.result is not None and len(stream.result.token_ids) == 50
