"""A request as the scheduler holds it: a small state machine, and the channel its reader reads.

`DecodeJob` is one answer to decode (its SafeCoDe state in a `decoding.Steering`
and `decoding.TextTracker`); `PrefillJob` a prefill-only pass (a self judge's
logits, a guard's). Each is waiting -> running -> finished, or cancelled /
failed; the scheduler thread writes to a job's `Channel` and never waits on
its reader.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..control import RequestControl
from ..errors import RequestTimeoutError, SafeCoDeError, StreamReaderError, UnsupportedContentError
from .adapters import PromptRow
from .decoding import Steering, TextTracker
from .kv_rows import PER_TOKEN_KEYS

__all__ = ["Channel", "DecodeJob", "PrefillJob", "Status", "prefill_error", "runs_alone", "same_prompt"]

Status = Literal["waiting", "running", "finished", "cancelled", "failed"]


# --------------------------------------------------------------------------- channel


class Channel:
    """A one-consumer queue between the scheduler thread and a request's reader.

    `put` never blocks; `get` blocks a thread; `aget` awaits on the reader's
    event loop (woken with `call_soon_threadsafe`), so asyncio readers need no
    thread of their own. Waking a reader costs the scheduler a thread switch
    and a turn of the GIL, so it is done only when the reader wants it: a
    reader that only wants the whole answer (`pieces_wanted = False`) is woken
    once, at the end; pieces put with `wake=False` are delivered by the next
    `wake()` (the scheduler wakes every reader of a step once, after the step).

    One reader at a time: a second thread or task that calls `get` / `aget`
    while another is waiting gets `StreamReaderError` at once (it would
    otherwise wait for pieces the first reader takes).
    """

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str, Any]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._ended = False
        self._reading = False
        self.pieces_wanted = True

    def put(self, kind: str, value: Any = None, *, wake: bool = True) -> None:
        with self._cond:
            self._items.append((kind, value))
            if kind != "piece":
                self._ended = True
            elif not (wake and self.pieces_wanted):
                return
        self.wake()

    def wake(self) -> None:
        """Wake the reader (a thread in `get`, or a task in `aget`) if it is waiting for what is here."""
        with self._cond:
            if not (self._ended or (self.pieces_wanted and self._items)):
                return
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # the reader's loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_wake, fut)

    def _ready(self) -> bool:
        return self._ended or (self.pieces_wanted and bool(self._items))

    def _enter(self) -> None:
        """Become the reader (under the lock); a second concurrent reader is refused."""
        if self._reading:
            raise StreamReaderError(
                "Another thread or task is already reading this stream. A stream has one reader: read it "
                "from one place (e.g. collect the pieces there and hand them on), or start one request per reader."
            )
        self._reading = True

    def get(self, timeout: float | None = None) -> tuple[str, Any]:
        with self._cond:
            self._enter()
            try:
                if not self._cond.wait_for(self._ready, timeout):
                    raise TimeoutError("no item within the timeout")
                return self._items.popleft()
            finally:
                self._reading = False

    async def aget(self, timeout: float | None = None) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        with self._cond:
            self._enter()
        try:
            while True:
                with self._cond:
                    if self._ready():
                        return self._items.popleft()
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append((loop, fut))
                if deadline is None:
                    await fut
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError("no item within the timeout")
                timer = loop.call_later(left, _wake, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
        finally:
            with self._cond:
                self._reading = False


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --------------------------------------------------------------------------- jobs


@dataclass(eq=False)
class DecodeJob:
    """One request to decode: its encoded prompt and its own SafeCoDe state."""

    prompt_rows: list[PromptRow]
    """The encoded prompt: one row per view (real, then noised); emptied once prefilled."""
    steering: Steering
    tracker: TextTracker
    eos_ids: frozenset[int]
    max_new_tokens: int
    prompt_len: int
    n_images: int = 0
    steered: bool = True
    """SafeCoDe decoding (False: plain decoding, e.g. `baseline` or a caption for a judge)."""
    timeout_s: float | None = None
    """Seconds from submission to the last token (None: no limit of its own; see `control`)."""
    control: RequestControl | None = None
    """The request's deadline and cancellation (judging and queueing included); the job ends when it does."""
    channel: Channel = field(default_factory=Channel)
    status: Status = "waiting"
    finish_reason: str | None = None
    error: BaseException | None = None
    t_submit: float = 0.0
    t_start: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0
    followers: list[DecodeJob] = field(default_factory=list)
    """Other answers to this very prompt (the n choices of one request) that take copies of this
    job's prefilled rows instead of prefilling their own (`Scheduler.submit(job, followers)`)."""
    _cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return self.steering.rows

    @property
    def all_rows(self) -> int:
        """Rows this job and its followers take in the batch once prefilled."""
        return self.rows * (1 + len(self.followers))

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - self.steering.t

    @property
    def deadline(self) -> float | None:
        own = None if self.timeout_s is None else self.t_submit + self.timeout_s
        other = None if self.control is None else self.control.deadline
        return own if other is None else (other if own is None else min(own, other))

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at its next step (safe from any thread)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self.control is not None and self.control.cancelled)

    @property
    def done(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")

    def timeout_error(self) -> RequestTimeoutError:
        """The error for a job past its deadline, naming the deadline that ended it."""
        own = None if self.timeout_s is None else self.t_submit + self.timeout_s
        if self.control is not None and self.control.deadline is not None and (own is None or self.control.deadline <= own):
            return self.control.timeout_error(f"{self.steering.t} token(s) were generated")
        return RequestTimeoutError(
            f"The request took longer than its timeout of {self.timeout_s:g} s (BatchingConfig.request_timeout_s, "
            f"queue time included; {self.steering.t} token(s) were generated). Ask for fewer tokens, retry when "
            "the model is less busy, or raise the timeout."
        )


@dataclass(eq=False)
class PrefillJob:
    """A prefill-only pass (a self judge's verdict prompt): the last position's logits, `(V,)`."""

    prompt_rows: list[PromptRow]
    """The encoded prompt (one row)."""
    alone: bool = False
    """Prefill this prompt by itself (exact logits), never in a padded batch."""
    future: concurrent.futures.Future[torch.Tensor] = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False
    """Set when its caller stopped waiting (cancelled or past its deadline): dropped before it runs."""
    control: RequestControl | None = None
    """The request it is for: once that is cancelled or past its deadline, the job is dropped too."""

    @property
    def dropped(self) -> bool:
        return self.cancelled or (self.control is not None and self.control.done)


def same_prompt(a: DecodeJob, b: DecodeJob) -> bool:
    """Whether `b` would prefill exactly what `a` does: the same rows (token ids, per-token inputs,
    images by their digest) and the same number of steered rows. Only then may `b` copy `a`'s rows."""
    if a.rows != b.rows or len(a.prompt_rows) != len(b.prompt_rows):
        return False
    for ra, rb in zip(a.prompt_rows, b.prompt_rows, strict=True):
        if ra.image_key != rb.image_key or ra.inputs.keys() != rb.inputs.keys():
            return False
        for key, va in ra.inputs.items():
            vb = rb.inputs[key]
            if ra.image_key is not None and key not in PER_TOKEN_KEYS and key != "input_ids":
                continue  # what the vision tower reads: `image_key` is its digest
            if isinstance(va, torch.Tensor) != isinstance(vb, torch.Tensor):
                return False
            if isinstance(va, torch.Tensor):
                if not (va.shape == vb.shape and torch.equal(va, vb)):
                    return False
            elif type(va) is not type(vb) or repr(va) != repr(vb):
                return False
    return True


def runs_alone(entry: DecodeJob | PrefillJob) -> bool:
    """Whether `entry` is a prefill-only pass to prefill by itself (exact logits), never in a padded group."""
    return isinstance(entry, PrefillJob) and entry.alone


def prefill_error(exc: Exception, model: Any, job: DecodeJob) -> Exception:
    """A model that cannot take this request (e.g. more images than it was built for) says so, typed."""
    if isinstance(exc, (RuntimeError, ValueError, TypeError, IndexError)) and not isinstance(exc, SafeCoDeError):
        error = UnsupportedContentError(
            f"{type(model).__name__} could not process this request ({job.n_images} image(s), "
            f"{job.prompt_len} prompt tokens): "
            f"{type(exc).__name__}: {str(exc).rstrip('.')}. Check that the model supports this many images per request."
        )
        error.__cause__ = exc
        return error
    return exc
