"""What a request gives back: the `SafeCoDeStream` a caller reads and the `SafeCoDeResult` it ends with.

A stream is the reading end of one request's `Channel` in the scheduler: text
pieces (stop strings held back) as they are decoded, iterated with `for` or
`async for`. Closing a stream, or dropping it, cancels the request: its rows
leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from .. import ops
from ..control import cancelled_error
from ..errors import OverloadedError, RequestTimeoutError
from ..verdict import Verdict
from .decoding import StepLogprob
from .jobs import DecodeJob
from .scheduler import Scheduler

if TYPE_CHECKING:
    from ..observability.records import RequestRecord

__all__ = [
    "FinishReason", "SafeCoDeResult", "SafeCoDeStream", "TokenLogprob", "TopLogprob", "Usage", "result_of", "token_logprobs",
]

FinishReason = Literal["stop", "length"]

class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    model_config = ConfigDict(frozen=True)

    token_id: int
    token: str
    """The token's text as the tokenizer decodes it alone."""
    logprob: float
    """Its natural-log probability in the distribution the answer's token was drawn from (-9999.0 at most
    improbable, OpenAI's floor)."""


class TokenLogprob(TopLogprob):
    """One answer token's log probability, with the likeliest alternatives of that step."""

    top_logprobs: list[TopLogprob]


class SafeCoDeResult(BaseModel):
    """One answer: text, new token ids, the verdict that steered it, and accounting."""

    model_config = ConfigDict(frozen=True)

    text: str
    """The answer only (no prompt echo), cut before any stop string."""
    token_ids: list[int]
    """The new tokens, including a final EOS token if one ended the answer."""
    verdict: Verdict | None
    """The verdict that steered decoding; None for `baseline()` answers."""
    answer_check: Verdict | None = None
    """The judge's verdict on the finished answer (`SafeCoDeConfig.check_answer`); None when not checked."""
    answer_replaced: bool = False
    """Whether the answer check found the answer unsafe and `text` is `answer_refusal` instead
    (`token_ids` are still the tokens the model decoded)."""
    finish_reason: FinishReason
    """"stop" for EOS or a stop string, "length" for `max_new_tokens`."""
    usage: Usage
    timings: dict[str, float]
    """Seconds: judge_s, queue_s (waiting for a place in the batch), prefill_s, decode_s, total_s."""
    refused: bool
    """Whether the answer opens with a refusal phrase."""
    logprobs: list[TokenLogprob] | None = None
    """With `logprobs=True`: one entry per token of `token_ids`, from the distribution it was drawn
    from (in the SafeCoDe window: the contrasted, modulated and penalised scores; see the README)."""
    constrained: bool = False
    """Whether a grammar (`constraint=`) shaped the answer; False when none was given, or when an
    unsafe verdict dropped it for a free-text refusal."""
    closed_early: bool = False
    """Whether `max_new_tokens` was about to cut a constrained answer and the grammar's shortest
    completion ended it instead (`SafeCoDeConfig.close_constrained`): the answer is complete and
    valid, but its last values are the closing path's (empty strings, zeros), not the model's."""


class SafeCoDeStream:
    """Text pieces of one answer as they are decoded; `verdict` is known on creation, `result` at the end.

    Iterate it from any thread, or `async for` it on an event loop. `close()`
    (or dropping the stream) cancels the request: its rows leave the batch at
    the scheduler's next step and nothing more is decoded for it.
    """

    def __init__(
        self, verdict: Verdict | None, job: DecodeJob, scheduler: Scheduler, judge_s: float, refusal_phrases: Sequence[str],
        *, record: RequestRecord | None = None,
    ) -> None:
        """`record` (tracing and audit) is finished when the stream ends, however it ends."""
        self.verdict = verdict
        self._record = record
        self.result: SafeCoDeResult | None = None
        self._job = job
        self._scheduler = scheduler
        self._judge_s = judge_s
        self._refusal_phrases = refusal_phrases
        self._ended = False
        self._started = False
        if job.control is not None:
            # a reader blocked in another thread wakes at once (the callback holds the job, not the
            # stream, so that dropping the stream still cancels it)
            job.control.on_cancel(lambda: _wake_cancelled(job))

    def start(self, *others: SafeCoDeStream, retry_follows: bool = False) -> SafeCoDeStream:
        """Queue the request for decoding (`stream(..., start=False)` leaves that to you; idempotent).

        `others`: unstarted streams of other answers to the same request (the n choices of one
        request, each with its own sampler): queued with this one in one step and prefilled once
        with it (they take copies of its rows). Raises `OverloadedError` when the model's queue is full.
        `retry_follows`: the caller may ask again when the queue is full, so such a refusal is not
        recorded yet: the caller then calls `abandon()` (asked again: no audit line for this attempt,
        the one that ends the request writes it) or `abandon(error)` (the request ends here).
        """
        if others and (self._started or any(o._started for o in others)):
            raise RuntimeError("streams that share a prefill are started together, once")
        if any(o._scheduler is not self._scheduler for o in others):
            raise RuntimeError("streams that share a prefill must be on one model")
        if not self._started:
            group = (self, *others)
            for one in group:
                one._started = True
            try:
                if others:
                    self._scheduler.submit(self._job, [o._job for o in others])
                else:
                    self._scheduler.submit(self._job)
            except Exception as exc:  # a full queue (or a request over the KV budget): this attempt ends here
                if not (retry_follows and isinstance(exc, OverloadedError)):
                    for one in group:
                        one._recorded(error=exc)
                raise
        return self

    # -- sync ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ended:
            raise StopIteration
        self.start()
        control = self._job.control
        try:
            item = self._job.channel.get(None if control is None else control.remaining())
        except TimeoutError:
            raise self._timed_out() from None
        return self._handle(*item)

    def consume(self) -> SafeCoDeResult:
        """Run to the end and return the result (the reader is woken once, at the end)."""
        self._job.channel.pieces_wanted = False
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    # -- async -----------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        if self._ended:
            raise StopAsyncIteration
        self.start()
        control = self._job.control
        try:
            try:
                item = await self._job.channel.aget(None if control is None else control.remaining())
            except TimeoutError:
                raise self._timed_out() from None
            return self._handle(*item)
        except StopIteration:
            raise StopAsyncIteration from None
        except asyncio.CancelledError:
            self.close()  # the awaiting task was cancelled: so is the request
            raise

    async def aconsume(self) -> SafeCoDeResult:
        self._job.channel.pieces_wanted = False
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    # -- both ------------------------------------------------------------------------------

    def _handle(self, kind: str, value: Any) -> str:
        if kind == "piece":
            return value
        self._ended = True
        if kind == "error":
            self._recorded(error=value)
            raise value
        if self._job.status == "cancelled":
            self._recorded(cancelled=True)
            raise cancelled_error()
        self.result = result_of(self._job, self.verdict, self._judge_s, self._refusal_phrases)
        self._recorded(result=self.result)
        raise StopIteration

    def abandon(self, error: BaseException | None = None) -> None:
        """End an attempt the full queue refused under `start(retry_follows=True)`: without `error`
        it was superseded by the attempt asked next (its span ends so marked, no audit line); with
        one, the request ends here and the attempt is recorded as failed with it."""
        self._ended = True
        if error is not None:
            self._recorded(error=error)
        elif self._record is not None:
            self._record.discard()

    def _recorded(self, result: SafeCoDeResult | None = None, error: BaseException | None = None,
                  cancelled: bool = False) -> None:
        if self._record is not None:
            self._record.finish(self._job, result, error, cancelled)

    def _timed_out(self) -> RequestTimeoutError:
        """The deadline passed while this reader waited: the request ends here (its rows leave the batch)."""
        self._ended = True
        self._job.cancel()
        assert self._job.control is not None
        error = self._job.control.timeout_error(f"{self._job.steering.t} token(s) were generated")
        self._recorded(error=error)
        return error

    def close(self) -> None:
        """Stop decoding this answer (no effect once it has ended; a stream never started is never queued)."""
        if not self._ended:
            self._ended = True
            self._job.cancel()
            if self._started:
                self._recorded(cancelled=True)
            elif self._record is not None:
                self._record.discard()  # never queued: no answer, no audit line (a caller re-asks or stops)
            if self._job.control is not None:
                self._job.control.cancel()
            self._started = True

    def __del__(self) -> None:
        job = getattr(self, "_job", None)
        if job is not None and not job.done:
            job.cancel()
        record = getattr(self, "_record", None)
        if record is not None:
            if getattr(self, "_started", False):
                record.finish(job, cancelled=True)  # no-op when the stream ended already
            else:
                record.discard()


def result_of(job: DecodeJob, verdict: Verdict | None, judge_s: float, refusal_phrases: Sequence[str]) -> SafeCoDeResult:
    """The result of a finished job: its text and tokens, the verdict that steered it, and its accounting."""
    ids = list(job.steering.generated)
    text = job.tracker.text
    return SafeCoDeResult(
        text=text,
        token_ids=ids,
        verdict=verdict,
        finish_reason="stop" if job.finish_reason == "stop" else "length",
        usage=Usage(prompt_tokens=job.prompt_len, completion_tokens=len(ids), total_tokens=job.prompt_len + len(ids)),
        timings={
            "judge_s": judge_s,
            "queue_s": max(job.t_start - job.t_submit, 0.0),
            "prefill_s": job.t_first - job.t_start,
            "decode_s": job.t_end - job.t_first,
            "total_s": judge_s + (job.t_end - job.t_submit),
        },
        refused=ops.opens_with_refusal(text, refusal_phrases),
        logprobs=token_logprobs(job.steering.logprobs, job.tracker.tokenizer) if job.steering.want_logprobs is not None else None,
        constrained=job.steering.constraint is not None,
        closed_early=job.steering.constraint is not None and job.steering.constraint.closed,
    )


def token_logprobs(steps: Sequence[StepLogprob], tokenizer: Any) -> list[TokenLogprob]:
    """The recorded steps with each token's text (one batched decode of every token named)."""
    ids = sorted({i for token, _, top in steps for i in (token, *(t for t, _ in top))})
    texts = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]), strict=True)) if ids else {}
    return [
        TokenLogprob(
            token_id=token, token=texts[token], logprob=lp,
            top_logprobs=[TopLogprob(token_id=t, token=texts[t], logprob=v) for t, v in top],
        )
        for token, lp, top in steps
    ]


def _wake_cancelled(job: DecodeJob) -> None:
    job.cancel()
    if not job.done:
        job.channel.put("error", cancelled_error())
