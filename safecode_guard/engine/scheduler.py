"""The loop that owns a model: continuous batching of SafeCoDe requests.

Requests from any thread or asyncio task enter one queue per model. One worker
thread owns the model: between decode steps it admits waiting requests,
prefills newcomers together (their prompts left-padded to one length, as
`generate` batches prompts; each row still computed as it would be alone),
lines the newcomers' rows up with the running batch (`kv_rows.merge`), and
then advances every active row with one forward pass per step. A request
leaves the batch the step it ends (EOS, a stop string, `max_new_tokens`, its
deadline, or its consumer going away), and its noised row leaves when its
SafeCoDe window ends. Nothing is held across a consumer's `yield`: consumers
read their own `Channel`, so a slow or vanished reader never stalls others.

Prefill is chunked: each turn of the loop prefills about
`BatchingConfig.prefill_chunk_tokens` prompt tokens' worth of work (over all
rows; deeper into a long prompt a token costs more, so chunks narrow), oldest
group first, and then runs one decode step, so a running stream waits about
one chunk and one step for its next token however long a newcomer's prompt
is. Images are encoded before, once per view (`Decoder.encode_images`), and
the features are kept a while under their pixels' digest: a self judge's
prompt and the answer's real view show the same images, so the vision tower
runs once for both. A model whose forward cannot take pre-encoded features
(Mllama's cross-attention, Llama 4; `adapters.Quirks.image_inputs`) gets its
raw pixel inputs with the whole prompt instead, several prompts together where
those stack.

A request is a small state machine: waiting -> running -> finished, or
cancelled / failed. Its SafeCoDe state (verdict, window, forced refusal
prefix, sampling and seeded generator, penalties, stop strings) lives in its
own `decoding.Steering` and `decoding.TextTracker`.

Judges batch too: a self-judge pass (`prefill_logits`) is a prefill-only job,
prefilled like any newcomer (grouped and chunked) but keeping only its last
logits; its KV rows are dropped at once. A guard judge queues several at once
(`submit_prefills`). Prefill-only jobs follow their request's control: once it
is cancelled or past its deadline they are dropped, queued or between chunks.

Limits and back-pressure (`BatchingConfig`, documented policy):

- a full queue refuses at once with `OverloadedError` (an HTTP server maps it to 429);
- a request that fits the queue waits for free rows (`max_batch_rows`) and KV
  budget (`kv_cache_budget_mb`), first come first served;
- a request that could never fit the KV budget alone is refused at once
  (`InputLimitError` naming the limit);
- a request past `request_timeout_s` (queue time included) fails with
  `RequestTimeoutError`, and its rows leave at the next step;
- a request whose prefill fails fails alone; if a batched step fails (e.g. out
  of memory), every request in that step fails with the error and the loop
  goes on with an empty batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import BatchingConfig
from ..control import RequestControl, current_control
from ..errors import (
    InputLimitError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    SafeCoDeError,
)
from .adapters import (
    Decoder,
    FeatureCache,
    ImageFeatures,
    Prefill,
    PromptRow,
    Quirks,
    chunk_cost,
    encode_rows,
)
from .jobs import DecodeJob, PrefillJob, prefill_error, runs_alone, same_prompt
from .kv_rows import RowBatch, kv_bytes_per_token, merge, unbatchable_reason

__all__ = ["WORKERS", "Scheduler"]

IDLE_EXIT_S = 2.0
"""Seconds an idle worker thread waits for new requests before it exits."""

WORKERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
"""Every worker thread started, until it is gone (threading holds a running one); stopped at exit
(`registry`)."""

PAD_SLACK = 1.25
"""Newcomers share a prefill while the padded group holds at most this many times their own tokens
(padding costs compute in the prefill; groups form among prompts of similar length)."""


# --------------------------------------------------------------------------- helpers


@dataclass(eq=False)
class _Group:
    """Newcomers prefilled together: one `Prefill` over their rows, in the order of `entries`."""

    entries: list[DecodeJob | PrefillJob]
    counts: list[int]
    """Rows of each entry."""
    features: list[ImageFeatures | None]
    """Image features of each row (kept to restart entries alone if the group fails)."""
    prefill: Prefill

    @property
    def rows(self) -> int:
        """Rows in the batch once prefilled: the prefill's, and copies of them for followers."""
        return self.prefill.size + sum(len(e.followers) * e.rows for e in self.entries if isinstance(e, DecodeJob))


_Item = tuple[DecodeJob | PrefillJob, list[ImageFeatures | None]]
"""A newcomer and the image features of its rows."""


# --------------------------------------------------------------------------- scheduler


class Scheduler:
    """Owns one model: a queue of requests and the worker thread that batches them.

    The worker runs only while there is work, and exits when the queue and the
    batch are empty (the next request starts a new one).
    """

    def __init__(self, model: Any, quirks: Quirks, settings: BatchingConfig | None = None) -> None:
        self.model = model
        self.quirks = quirks
        self.settings = settings or BatchingConfig()
        self.decoder = Decoder(model, quirks)
        self.kv_token_bytes = kv_bytes_per_token(model)
        self.batchable: bool | None = None
        """None until the first prefill shows the cache kind; False: one request at a time."""
        self.unbatchable_reason: str | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[DecodeJob] = collections.deque()
        self._prefills: list[PrefillJob] = []
        self._groups: list[_Group] = []  # newcomers being prefilled, oldest first
        self._features = FeatureCache(self.settings.image_cache_mb)
        self._active: list[DecodeJob] = []
        self._owners: list[DecodeJob] = []  # row i of the batch belongs to _owners[i]
        self._rows: RowBatch | None = None
        self._worker: threading.Thread | None = None
        self._closing = False
        self._preparing = 0  # requests being prepared for this model right now
        self._burst_deadline: float | None = None
        self.steps = 0
        self.step_rows: collections.Counter[int] = collections.Counter()  # decode steps by batch size
        self.stats: collections.Counter[str] = collections.Counter()
        self.on_step: Callable[[int], None] | None = None
        """Test and metrics hook: called with the batch size before each decode step."""

    # -- the caller's side ------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return sum(1 + len(job.followers) for job in self._waiting)

    @property
    def active_rows(self) -> int:
        with self._cond:
            return len(self._owners)

    @property
    def preparing_requests(self) -> int:  # being prepared (images, prompt, judge), not queued yet
        return self._preparing

    @property
    def prefilling_requests(self) -> int:  # taken from the queue, prompts being prefilled
        return sum(
            1 + len(entry.followers) for group in list(self._groups) for entry in group.entries
            if isinstance(entry, DecodeJob)
        )

    def submit(self, job: DecodeJob, followers: Sequence[DecodeJob] = ()) -> DecodeJob:
        """Queue `job` (never blocks). Raises `OverloadedError` when the queue is full.

        `followers` are other answers to the same prompt (the n choices of one request): they
        are queued with `job` in one step and prefilled once, with it; each takes a copy of its
        rows and first logits and decodes on with its own sampler. A follower whose prompt is not
        exactly `job`'s (`jobs.same_prompt`) is queued as a request of its own.
        """
        for one in (job, *followers):
            if one.t_submit or one.followers:
                raise RuntimeError("this request was already queued once; a DecodeJob is decoded once")
        shared = [f for f in followers if same_prompt(job, f)]
        alone = [f for f in followers if not any(f is g for g in shared)]
        s = self.settings
        for one, copies in ((job, 1 + len(shared)), *((f, 1) for f in alone)):
            need = self.kv_token_bytes * one.rows * copies * (one.prompt_len + one.max_new_tokens)
            if s.kv_cache_budget_mb is not None and need > s.kv_cache_budget_mb * 2**20:
                answers = f"{copies} answers x " if copies > 1 else ""
                raise InputLimitError(
                    f"This request needs about {need / 2**20:.1f} MB of KV cache ({answers}{one.prompt_len} prompt "
                    f"tokens + {one.max_new_tokens} new, {one.rows} row(s)), more than the whole budget of "
                    f"{s.kv_cache_budget_mb:g} MB (BatchingConfig.kv_cache_budget_mb). Shorten the prompt, ask for "
                    "fewer tokens or answers, or raise the budget."
                )
        queued = [job, *alone]
        with self._cond:
            if len(self._waiting) + len(queued) > s.max_queue:
                self._expire_waiting()  # cancelled and expired requests give their places back first
            if len(self._waiting) + len(queued) > s.max_queue:
                self.stats["overloaded"] += 1
                raise OverloadedError(
                    f"The model's queue is full ({s.max_queue} requests waiting; BatchingConfig.max_queue). "
                    "Retry shortly, or raise max_queue."
                )
            now = time.perf_counter()
            for one in (job, *followers):
                one.t_submit = now
            job.followers = shared
            self._waiting.extend(queued)
            self._ensure_worker()
            self._cond.notify_all()
        for one in (job, *followers):
            if one.control is not None:
                one.control.on_cancel(self._poke)  # a cancelled request leaves the queue without waiting for a step
        return job

    def _poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def prefill_logits(self, processor: Any, prompt: str, images: Sequence[Any], *, alone: bool = False) -> torch.Tensor:
        """Last-position logits `(V,)` (float32, CPU) of `prompt` with `images`: one prefill.

        Concurrent calls are prefilled together; `alone=True` keeps this one out of any batch.
        The wait follows the current request's control (`control.current_control()`): when the
        request is cancelled or runs past its deadline, the job is dropped before it runs and the
        call raises `RequestCancelledError` / `RequestTimeoutError`.
        """
        control = current_control()
        if control is not None:
            control.check()
        job = self._submit_prefill(processor, prompt, images, alone=alone, control=control)
        if control is None:
            return job.future.result()
        try:
            return control.wait_future(job.future)
        except (RequestCancelledError, RequestTimeoutError):
            with self._cond:
                job.cancelled = True  # still queued: the worker drops it
            raise

    def submit_prefill(
        self, processor: Any, prompt: str, images: Sequence[Any], *, alone: bool = False
    ) -> concurrent.futures.Future[torch.Tensor]:
        """`prefill_logits` without waiting: queue it and return its future."""
        return self.submit_prefills(processor, [(prompt, images)], alone=alone)[0]

    def submit_prefills(
        self, processor: Any, prompts: Sequence[tuple[str, Sequence[Any]]], *, alone: bool = False
    ) -> list[concurrent.futures.Future[torch.Tensor]]:
        """Queue the prefills of several `(prompt, images)` at once (so the worker sees them together
        and prefills them as one group where they fit) and return their futures, in order.

        The jobs follow the current request's control (`control.current_control()`): once that is
        cancelled or past its deadline, those not yet prefilled are dropped, their futures cancelled.
        """
        control = current_control()
        jobs = [self._encode_prefill(processor, prompt, images, alone=alone, control=control) for prompt, images in prompts]
        self._enqueue_prefills(jobs)
        return [job.future for job in jobs]

    def _submit_prefill(
        self, processor: Any, prompt: str, images: Sequence[Any], *, alone: bool, control: RequestControl | None = None
    ) -> PrefillJob:
        job = self._encode_prefill(processor, prompt, images, alone=alone, control=control)
        self._enqueue_prefills([job])
        return job

    @staticmethod
    def _encode_prefill(
        processor: Any, prompt: str, images: Sequence[Any], *, alone: bool, control: RequestControl | None
    ) -> PrefillJob:
        # encoded here, in the caller's thread: the worker only runs the model
        rows = encode_rows(processor, prompt, [list(images)] if images else [])
        return PrefillJob(rows, alone=alone, control=control)

    def _enqueue_prefills(self, jobs: list[PrefillJob]) -> None:
        with self._cond:
            self._prefills.extend(jobs)
            self._ensure_worker()
            self._cond.notify_all()

    def clear_image_cache(self) -> None:
        """Forget the image features kept for reuse (benchmarks call it so each run encodes its images)."""
        with self._cond:
            self._features = FeatureCache(self.settings.image_cache_mb)

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything queued or decoding and wait for the worker to stop (used at exit).

        The scheduler stays usable: a later request starts a new worker.
        """
        with self._cond:
            worker = self._worker
            self._closing = True  # also catches jobs admitted but not yet running
            for job in list(self._waiting):
                job.cancel()
                for follower in job.followers:
                    follower.cancel()
            for job in itertools.chain(self._active, *(g.entries for g in self._groups)):
                if isinstance(job, DecodeJob):
                    job.cancel()
                    for follower in job.followers:
                        follower.cancel()
            self._cond.notify_all()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
        with self._cond:
            self._closing = False

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name="safecode-scheduler", daemon=True)
            WORKERS.add(self._worker)
            self._worker.start()

    # -- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                self._expire_waiting()
                if not (self._active or self._waiting or self._prefills or self._groups):
                    # Linger a moment before exiting: a thread keeps its allocator arena and its
                    # OpenMP team warm for the next request (and a model is not freed meanwhile).
                    now = time.perf_counter()
                    idle_since = idle_since or now
                    if self._closing or now - idle_since >= IDLE_EXIT_S:
                        self._worker = None
                        return
                    self._cond.wait(IDLE_EXIT_S - (now - idle_since))
                    continue
                idle_since = None
                # judge prefills that came in while gathering run first; the gathering goes on after
                admitted = [] if self._gather_burst() else self._admissible()
                prefills: list[PrefillJob] = []
                for job in self._prefills:
                    if job.dropped:
                        job.future.cancel()  # nobody waits for it any more
                    else:
                        prefills.append(job)
                self._prefills = []
                if not (admitted or prefills or self._active or self._groups):
                    self._cond.wait(0.05)  # waiting requests that do not fit yet (cannot happen alone)
                    continue
            self._begin([*prefills, *admitted])
            self._prefill_some()
            if self._active:
                self._step()

    def preparing(self) -> contextlib.AbstractContextManager[None]:
        """Mark a request as being prepared for this model (images, prompt, judge) until it is queued."""
        return _Preparing(self)

    def _gather_burst(self) -> bool:
        """At the start of a burst, wait briefly for requests still being prepared (under the lock).

        Requests that start together are prefilled together and decode without
        left padding (padding costs every later step a masked attention). Only
        when nothing is decoding, so no running answer is held up, and at most
        `BatchingConfig.gather_ms` per burst. A request being prepared may be
        waiting for its self judge's prefill: when one arrives, the wait stops
        (returning True) so that the prefill runs, and resumes afterwards.
        """
        if self._active or self._groups or not self._waiting or not self.settings.enabled:
            self._burst_deadline = None
            return False
        if self._burst_deadline is None:
            self._burst_deadline = time.perf_counter() + self.settings.gather_ms / 1000
        while self._preparing > 0 and not self._closing and not self._prefills:
            left = self._burst_deadline - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)
        return bool(self._prefills) and self._preparing > 0

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        keep: collections.deque[DecodeJob] = collections.deque()
        for job in self._waiting:
            if job.cancelled or (job.deadline is not None and now > job.deadline):
                heir = self._leader(job, now)
                if heir is not None:
                    keep.append(heir)
            else:
                keep.append(job)
        self._waiting = keep

    def _ended_early(self, job: DecodeJob, now: float) -> bool:
        """End `job` if it was cancelled or ran past its deadline; True then."""
        if self._closing:
            job.cancel()
        if job.cancelled:
            self._end(job, "cancelled")
        elif job.deadline is not None and now > job.deadline:
            self._fail(job, job.timeout_error())
        else:
            return False
        return True

    def _leader(self, job: DecodeJob, now: float) -> DecodeJob | None:
        """`job`, or when it has ended early the first of its followers still wanted, which takes its
        place with the others (they share one prompt); None when none is left."""
        if not self._ended_early(job, now):
            return job
        job.prompt_rows = []
        rest = [f for f in job.followers if not self._ended_early(f, now)]
        job.followers = []
        if not rest:
            return None
        heir = rest[0]
        heir.followers = rest[1:]
        return heir

    def _admissible(self) -> list[DecodeJob]:
        """Waiting jobs that fit now, first come first served (called under the lock)."""
        s = self.settings
        admitted: list[DecodeJob] = []
        prefilling = [e for g in self._groups for e in g.entries if isinstance(e, DecodeJob)]
        rows = len(self._owners) + sum(g.rows for g in self._groups)
        length = max([self._rows.length if self._rows is not None else 0, *(g.prefill.length + 1 for g in self._groups)])
        remaining = max([j.remaining for j in self._active] + [j.max_new_tokens for j in prefilling], default=0)
        # until a first prefill shows whether rows can be realigned, one request goes first
        one_at_a_time = not s.enabled or self.batchable is not True
        while self._waiting:
            job = self._waiting[0]
            busy = bool(self._active or prefilling or admitted)
            if one_at_a_time and busy:
                break
            if busy and rows + job.all_rows > s.max_batch_rows:
                break
            new_length = max(length, job.prompt_len + 1)
            new_remaining = max(remaining, job.max_new_tokens)
            if busy and s.kv_cache_budget_mb is not None:
                projected = self.kv_token_bytes * (rows + job.all_rows) * (new_length + new_remaining)
                if projected > s.kv_cache_budget_mb * 2**20:
                    break
            admitted.append(self._waiting.popleft())
            rows, length, remaining = rows + job.all_rows, new_length, new_remaining
        return admitted

    # -- prefill: newcomers and judges -------------------------------------------------------

    def _begin(self, entries: list[DecodeJob | PrefillJob]) -> None:
        """Encode the newcomers' images (once per view; reused when seen before) and group them for prefill."""
        ready: list[_Item] = []
        for entry in entries:
            if isinstance(entry, DecodeJob):
                heir = self._leader(entry, time.perf_counter())
                if heir is None:
                    continue
                entry = heir
            try:
                features = [self._image_features(row) for row in entry.prompt_rows]
            except Exception as exc:
                self._entry_failed(entry, exc)
                continue
            if isinstance(entry, DecodeJob):
                for job in (entry, *entry.followers):
                    job.status = "running"
                    job.t_start = time.perf_counter()
            ready.append((entry, features))
        for items in self._grouped(ready):
            self._open(items)

    def _image_features(self, row: PromptRow) -> ImageFeatures | None:
        if row.image_key is None:
            return None
        features = self._features.get(row.image_key)
        if features is not None:
            self.stats["image_cache_hits"] += 1
            return features
        features = self.decoder.encode_images(row)
        if features is not None:  # None: a model that reads raw pixels in its prefill
            self.stats["image_encodings"] += 1
            self._features.put(row.image_key, features)
        return features

    def _grouped(self, ready: list[_Item]) -> list[list[_Item]]:
        """Newcomers in prefill groups: by length, while padding stays small and the rows fit.

        Until the first prefill shows the cache can be batched, and with batching
        off, every request is prefilled alone.
        """
        if not (self.batchable and self.settings.enabled):
            return [[item] for item in ready]
        groups: list[list[_Item]] = []
        for item in sorted(ready, key=lambda item: item[0].prompt_rows[0].length):
            last = groups[-1] if groups else None
            if last is not None and not runs_alone(item[0]) and not runs_alone(last[0][0]) and self._fits([*last, item]):
                last.append(item)
            else:
                groups.append([item])
        return groups

    def _fits(self, items: list[_Item]) -> bool:
        rows = [row for entry, _ in items for row in entry.prompt_rows]
        lengths = [row.length for row in rows]
        return (
            len(lengths) <= self.settings.max_batch_rows
            and max(lengths) * len(lengths) <= PAD_SLACK * sum(lengths)
            and self.decoder.can_share(rows, [f for _, features in items for f in features])
        )

    def _open(self, items: list[_Item]) -> None:
        entries = [entry for entry, _ in items]
        features = [f for _, fs in items for f in fs]
        try:
            prefill = Prefill(self.decoder, [row for e in entries for row in e.prompt_rows], features)
        except Exception as exc:
            if len(items) > 1:
                for item in items:
                    self._open([item])
            else:
                self._entry_failed(entries[0], exc)
            return
        with self._cond:
            self._groups.append(_Group(entries, [len(e.prompt_rows) for e in entries], features, prefill))

    def _prefill_some(self) -> None:
        """Prefill chunks of the waiting groups, oldest first, about one chunk's worth of tokens in all.

        With rows decoding, this bounds their wait for the next token to about one
        chunk and one decode step; with nothing decoding, the loop comes straight back.
        A group's chunk boundaries depend on its own rows only (never on what else is
        waiting), so a prompt alone is always prefilled the same way.
        """
        budget = self.settings.prefill_chunk_tokens
        spent = 0.0
        for group in list(self._groups):
            if not self._drop_gone_from(group):
                continue
            prefill = group.prefill
            while not prefill.finished:
                start, end = prefill.done, prefill.next_end(budget)
                cost = chunk_cost(prefill.size, start, end, prefill.span)
                if budget is not None and spent and spent + cost > budget:
                    return  # the next chunk waits for the next turn, after a decode step
                try:
                    self.decoder.run_chunk(prefill, end)
                except Exception as exc:
                    self._group_failed(group, exc)
                    break
                self.stats["prefill_chunks"] += 1
                spent += cost
            if prefill.finished and group in self._groups:
                self._finish(group)

    def _drop_gone_from(self, group: _Group) -> bool:
        """Remove cancelled and expired requests from a prefilling group; False when none is left."""
        now = time.perf_counter()
        gone: set[int] = set()
        for i, entry in enumerate(group.entries):
            if isinstance(entry, PrefillJob):
                if entry.dropped:  # its caller stopped waiting: no more chunks for it
                    entry.future.cancel()
                    entry.prompt_rows = []
                    gone.add(i)
                continue
            heir = self._leader(entry, now)
            if heir is not None:
                group.entries[i] = heir  # a follower takes over its rows (the same prompt)
                continue
            gone.add(i)
        if not gone:
            return True
        starts = [0, *itertools.accumulate(group.counts)]
        kept = [i for i in range(len(group.entries)) if i not in gone]
        with self._cond:
            if not kept:
                self._groups.remove(group)
                return False
            group.prefill.select([r for i in kept for r in range(starts[i], starts[i + 1])])
            group.features = [f for i in kept for f in group.features[starts[i] : starts[i + 1]]]
            group.entries = [group.entries[i] for i in kept]
            group.counts = [group.counts[i] for i in kept]
        return True

    def _group_failed(self, group: _Group, exc: Exception) -> None:
        with self._cond:
            self._groups.remove(group)
        if len(group.entries) == 1:
            self._entry_failed(group.entries[0], exc)
            return
        # one bad request must not fail its neighbours: each starts again, alone
        starts = [0, *itertools.accumulate(group.counts)]
        for i, entry in enumerate(group.entries):
            self._open([(entry, group.features[starts[i] : starts[i + 1]])])

    def _entry_failed(self, entry: DecodeJob | PrefillJob, exc: Exception) -> None:
        if isinstance(entry, PrefillJob):
            entry.future.set_exception(exc)
            return
        error = prefill_error(exc, self.model, entry)
        for job in (entry, *entry.followers):  # the same prompt: the same failure
            job.prompt_rows = []
            self._fail(job, error)
        entry.followers = []

    def _finish(self, group: _Group) -> None:
        """A group is prefilled: judges get their logits; requests choose their first tokens and join the batch."""
        with self._cond:
            self._groups.remove(group)
        rows, logits = self.decoder.finish(group.prefill)
        if self.batchable is None:
            self.unbatchable_reason = unbatchable_reason(rows.cache)
            self.batchable = self.unbatchable_reason is None
        if len(group.entries) > 1:
            self.stats["shared_prefills"] += 1
        if sum(isinstance(e, PrefillJob) for e in group.entries) > 1:
            self.stats["judge_batches"] += 1
        keep: list[int] = []
        owners: list[DecodeJob] = []
        first = 0
        now = time.perf_counter()
        for entry, n in zip(group.entries, group.counts, strict=True):
            entry.prompt_rows = []  # pixels are prefill-only: free them now
            if isinstance(entry, PrefillJob):
                entry.future.set_result(logits[first].float().cpu())
                first += n
                continue
            # followers (the other choices of one request) take copies of the leader's rows and
            # logits, and draw their own first tokens; the leader goes last, with the originals
            self.stats["prefills_shared"] += len(entry.followers)
            for job in (*entry.followers, entry):
                job.prompt_rows = []
                job.t_first = now
                if job is not entry and self._ended_early(job, now):
                    continue
                try:
                    token = job.steering.choose(logits[first : first + n] if job is entry else logits[first : first + n].clone())
                except Exception as exc:
                    self._fail(job, exc)
                    continue
                if not self._accept(job, token):
                    # the noised row leaves at once if the window is already over
                    keep += list(range(first, first + job.rows))
                    owners += [job] * job.rows
            entry.followers = []  # on their own from here
            first += n
        if not keep:
            return
        if keep != list(range(rows.size)):
            rows.select(keep)  # a row kept twice is copied (batch_select_indices indexes)
            rows.trim()
        with self._cond:
            self._rows = rows if self._rows is None else merge(self._rows, rows)
            self._owners.extend(owners)
            self._active.extend(dict.fromkeys(owners))

    def _step(self) -> None:
        """One forward for every active row, then each request's next token."""
        self._drop_gone()
        if not self._active:
            return
        assert self._rows is not None
        tokens = torch.tensor([j.steering.generated[-1] for j in self._owners], dtype=torch.long)
        if self.on_step is not None:
            self.on_step(len(self._owners))
        try:
            logits = self.decoder.step(self._rows, tokens)
        except Exception as exc:
            error = SafeCoDeError(f"The batched decode step failed ({type(exc).__name__}: {exc}).")
            error.__cause__ = exc
            for job in list(self._active):
                self._fail(job, error)
            with self._cond:
                self._active, self._owners, self._rows = [], [], None
            return
        self.steps += 1
        self.step_rows[len(self._owners)] += 1
        first_row: dict[int, int] = {}
        for i, job in enumerate(self._owners):
            first_row.setdefault(id(job), i)
        greedy = [j for j in self._active if j.steering.plain_greedy]
        if greedy:
            # the common case after the window, for all greedy rows in one op and one device sync
            idx = torch.tensor([first_row[id(j)] for j in greedy], device=logits.device)
            chosen = dict(zip(map(id, greedy), logits.index_select(0, idx).argmax(-1).tolist(), strict=True))
        else:
            chosen = {}
        ended = False
        for job in list(self._active):
            i = first_row[id(job)]
            try:
                token = chosen[id(job)] if id(job) in chosen else job.steering.choose(logits[i : i + job.rows])
            except Exception as exc:
                self._fail(job, exc)
                ended = True
                continue
            ended |= self._accept(job, token, wake=False)
        self._prune(force=ended)
        for job in self._owners:  # readers wake once, together, while the next forward runs
            job.channel.wake()

    def _accept(self, job: DecodeJob, token: int, *, wake: bool = True) -> bool:
        """Record and emit `token`; True when the job has ended."""
        job.steering.accept(token)
        piece = job.tracker.add(token)
        if piece:
            job.channel.put("piece", piece, wake=wake)
        if token in job.eos_ids or job.tracker.stopped or job.steering.grammar_done:
            self._end(job, "stop")
            return True
        if job.steering.t >= job.max_new_tokens:
            self._end(job, "length")
            return True
        return False

    def _drop_gone(self) -> None:
        """Remove cancelled and expired requests before spending a step on them."""
        now = time.perf_counter()
        gone = False
        for job in self._active:
            if self._closing:
                job.cancel()
            if job.cancelled:
                self._end(job, "cancelled")
                gone = True
            elif job.deadline is not None and now > job.deadline:
                self._fail(job, job.timeout_error())
                gone = True
        if gone:
            self._prune(force=True)

    def _prune(self, force: bool = False) -> None:
        """Drop the rows of ended requests and of windows that just closed."""
        keep: list[int] = []
        owners: list[DecodeJob] = []
        seen: dict[int, int] = {}
        for i, job in enumerate(self._owners):
            if job.done:
                continue
            n = seen.get(id(job), 0)
            if n < job.rows:
                keep.append(i)
                owners.append(job)
            seen[id(job)] = n + 1
        if len(keep) == len(self._owners) and not force:
            return
        with self._cond:
            self._active = [j for j in self._active if not j.done]
            self._owners = owners
            if not keep:
                self._rows = None
            elif len(keep) < self._rows.size:
                self._rows.select(keep)
                self._rows.trim()
            self._cond.notify_all()

    def _end(self, job: DecodeJob, reason: str) -> None:
        tail = job.tracker.flush() if reason in ("stop", "length") else ""
        if tail:
            job.channel.put("piece", tail)
        job.finish_reason = reason
        job.status = "cancelled" if reason == "cancelled" else "finished"
        job.t_end = time.perf_counter()
        self.stats[f"finished_{reason}"] += 1
        job.channel.put("done")

    def _fail(self, job: DecodeJob, error: BaseException) -> None:
        job.error = error
        job.status = "failed"
        job.t_end = time.perf_counter()
        self.stats["failed"] += 1
        job.channel.put("error", error)



class _Preparing:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def __enter__(self) -> None:
        with self.scheduler._cond:
            self.scheduler._preparing += 1

    def __exit__(self, *exc: Any) -> None:
        with self.scheduler._cond:
            self.scheduler._preparing -= 1
            self.scheduler._cond.notify_all()
