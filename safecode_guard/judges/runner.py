"""`run_judge`: the timeout on capped worker threads, re-validation, the threshold, and the failure policies."""

from __future__ import annotations

import contextvars
import math
import numbers
import threading
import time
from collections.abc import Callable
from typing import Any

from ..config import SafeCoDeConfig
from ..control import RequestControl, current_control
from ..errors import (
    InvalidVerdictError,
    JudgeBusyError,
    JudgeError,
    JudgeTruncatedError,
    RequestCancelledError,
    RequestTimeoutError,
    SafeCoDeInputError,
)
from ..verdict import Verdict, label_from_score, validated_verdict
from .builtin import FixedJudge
from .request import Judge, JudgeRequest, judge_name
from .self_judge import SelfJudge
from .view import VIEW_LOG, ViewLog

__all__ = [
    "DEFAULT_MAX_JUDGE_THREADS",
    "JUDGE_ERROR_CODES",
    "judge_error_code",
    "run_judge",
    "set_max_judge_threads",
]


# --------------------------------------------------------------------------- run_judge

DEFAULT_MAX_JUDGE_THREADS = 32
"""Judge worker threads that may be alive at once, process-wide (`set_max_judge_threads`)."""


class _JudgeThreads:
    """A process-wide cap on live judge threads.

    Each timed judge call runs in a daemon thread that holds one slot until the
    judge returns, even when the caller has stopped waiting (a Python thread
    cannot be killed). So hung judges can hold at most `limit` threads; a call
    that finds every slot taken waits for one within its own timeout, then
    fails with `JudgeBusyError`. Threads are daemons so a hung judge never
    blocks interpreter exit (a `ThreadPoolExecutor` would).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def resize(self, limit: int) -> None:
        # Running calls keep and release the semaphore they took; new calls use the new one.
        self.limit, self._slots = limit, threading.BoundedSemaphore(limit)

    def call(
        self, fn: Callable[[], Any], timeout_s: float | None, name: str, control: RequestControl | None = None
    ) -> Any:
        """`fn()` in a worker thread; give up after `timeout_s` seconds in all (slot wait included).

        With `control` the wait also ends when the request is cancelled or runs
        past its deadline (`RequestCancelledError` / `RequestTimeoutError`); the
        thread cannot be killed and finishes on its own, its result discarded.
        `timeout_s=None` waits for the judge as long as the control allows.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        slots, limit = self._slots, self.limit
        if not self._acquire(slots, deadline, control):
            raise JudgeBusyError(
                f"all {limit} judge threads are busy (judges still running past their timeout?), so judge "
                f"{name!r} could not start within judge_timeout_s={timeout_s:g}s. Fix or speed up the "
                "hanging judge, or raise the cap with `safecode_guard.judges.set_max_judge_threads(n)`."
            )
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller thread, which decides
                box["error"] = exc
            finally:
                slots.release()
                done.set()

        # Copy contextvars so LangChain callbacks and tracing see the caller's context.
        ctx = contextvars.copy_context()
        worker = threading.Thread(target=ctx.run, args=(work,), name=f"safecode-judge[{name}]", daemon=True)
        try:
            worker.start()
        except BaseException:
            slots.release()
            raise
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        finished = control.wait(done, left) if control is not None else done.wait(left)
        if not finished:
            raise TimeoutError(
                f"judge {name!r} gave no verdict within judge_timeout_s={timeout_s:g}s "
                "(raise `judge_timeout_s` if the judge is just slow)"
            )
        if "error" in box:
            raise box["error"]
        return box["result"]

    @staticmethod
    def _acquire(slots: threading.BoundedSemaphore, deadline: float | None, control: RequestControl | None) -> bool:
        """Take a slot by `deadline`; with a control, in short waits so a cancelled request stops waiting."""
        if control is None:
            return slots.acquire(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        while True:
            control.check()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return slots.acquire(blocking=False)
            remaining = control.remaining()
            wait = min(x for x in (left, remaining, _SLOT_POLL_S) if x is not None)
            if slots.acquire(timeout=wait):
                return True


_SLOT_POLL_S = 0.05
"""How often a request waiting for a judge thread checks whether it was cancelled."""


_THREADS = _JudgeThreads(DEFAULT_MAX_JUDGE_THREADS)


def set_max_judge_threads(limit: int) -> None:
    """Cap the judge worker threads alive at once, process-wide (default `DEFAULT_MAX_JUDGE_THREADS`).

    Raise it when many requests at once wait on a slow remote judge; every
    timed `run_judge` call holds one thread until its judge returns.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 4096:
        raise SafeCoDeInputError(f"`limit` (={limit!r}) must be an integer from 1 to 4096, e.g. 32.")
    _THREADS.resize(limit)


def run_judge(
    judge: Judge, request: JudgeRequest, config: SafeCoDeConfig | None = None, *, control: RequestControl | None = None
) -> Verdict:
    """Run `judge` on `request` and return a validated `Verdict` (never hangs past the timeout).

    The judge runs in a daemon worker thread and the caller stops waiting after
    `config.judge_timeout_s` seconds (None: run inline, wait forever). A Python
    thread cannot be killed, so a timed-out judge keeps running in the
    background until it returns on its own; its result is discarded. Worker
    threads are capped process-wide (`set_max_judge_threads`); when every one
    is taken the call fails with `JudgeBusyError`. (For a `SelfJudge` a
    timed-out judge means the model may still be busy with the judge prompt.)

    Normalising: a label string becomes a `Verdict`; a float score becomes a
    label via `label_from_score(score, request.threshold)`; a `Verdict` is
    validated again (`validated_verdict`: one built with `model_construct` or
    `model_copy(update=...)` may hold anything) and, if its label disagrees
    with its score under the threshold, relabelled from the score. The result
    gets `source="judge"`, `latency_s`, and the judge's name (unless the
    Verdict already names a judge).

    A failure (exception, timeout, no free thread, invalid or unparseable
    return) follows `config.on_judge_error`: "unsafe"/"safe" give a
    `source="fallback"` Verdict whose `error` holds the exception type and
    message; "raise" raises `JudgeError` chained from the cause.

    A judge that saw only part of the request (its verdict says
    `transcript_truncated`, or it rendered a truncated `judge_view` while it
    ran, which covers your own judges too) cannot call it safe unless
    `config.on_judge_truncation` is "safe": by default the verdict becomes an
    unsafe `source="fallback"` one whose `error` says why; "raise" raises
    `JudgeTruncatedError`.

    The request's own deadline and cancellation (`control`, default
    `control.current_control()`) are not judge failures: when the request is
    cancelled or runs past its deadline while the judge runs, the caller stops
    waiting and `RequestCancelledError` / `RequestTimeoutError` is raised. With
    a control, every judge but the self judge (whose waits follow the control
    themselves) and `FixedJudge` runs in a worker thread, even with
    `judge_timeout_s=None`, so that the wait can end.
    """
    config = config if config is not None else SafeCoDeConfig()
    if not callable(judge):
        raise TypeError(
            f"judge is a {type(judge).__name__}, which cannot be called. Pass a judge object, a "
            "callable, or build one with `make_judge(...)` (e.g. make_judge('self'))."
        )
    name = judge_name(judge)
    control = control if control is not None else current_control()
    start = time.perf_counter()
    views = ViewLog()
    token = VIEW_LOG.set(views)  # copied into the worker thread's context with everything else
    try:
        if control is not None:
            control.check()
        inline = config.judge_timeout_s is None and (control is None or isinstance(judge, (SelfJudge, FixedJudge)))
        if inline:
            raw = judge(request)
        else:
            raw = _THREADS.call(lambda: judge(request), config.judge_timeout_s, name, control)
        verdict = _normalise(raw, request.threshold, name)
    except Exception as exc:
        if control is not None and control.done:
            # the request's deadline or cancellation, not the judge's failure: no fallback
            if isinstance(exc, (RequestCancelledError, RequestTimeoutError)):
                raise
            control.check()
        latency = time.perf_counter() - start
        error = f"{type(exc).__name__}: {exc}"
        if config.on_judge_error == "raise":
            raise JudgeError(
                f"Judge {name!r} failed ({error}). Fix the judge, or set "
                "`on_judge_error` to 'unsafe' (fail closed) or 'safe' (fail open) to fall back."
            ) from exc
        return Verdict(
            label=config.on_judge_error,
            unsafe_score=None,
            judge=name,
            source="fallback",
            error=error,
            latency_s=latency,
        )
    finally:
        VIEW_LOG.reset(token)
    latency = time.perf_counter() - start
    truncated = verdict.transcript_truncated or views.truncated is not None
    verdict = verdict.model_copy(update={"source": "judge", "latency_s": latency, "transcript_truncated": truncated})
    if truncated and verdict.label == "safe" and config.on_judge_truncation != "safe":
        return _truncated_fallback(verdict, views.truncated, config)
    return verdict


def _truncated_fallback(verdict: Verdict, budget: int | None, config: SafeCoDeConfig) -> Verdict:
    """The fail-closed answer to a "safe" verdict on a partial view (`on_judge_truncation`)."""
    score = "" if verdict.unsafe_score is None else f" (unsafe score {verdict.unsafe_score:.3g})"
    limit = f" of {budget} characters" if budget is not None else ""
    message = (
        f"judge {verdict.judge!r} found the request safe{score} after seeing only part of it: the "
        f"conversation, tools and request do not fit its budget{limit}, and harm in the part left out "
        "would go unjudged. Raise the judge's `max_transcript_chars` (e.g. SelfJudge(max_transcript_chars=...) "
        "or ChatModelJudge(..., max_transcript_chars=...)) to fit what the model reads, or set "
        "`on_judge_truncation='safe'` to accept verdicts on the most recent part."
    )
    if config.on_judge_truncation == "raise":
        raise JudgeTruncatedError(message[0].upper() + message[1:])
    return verdict.model_copy(
        update={
            "label": "unsafe",
            "unsafe_score": None,  # the judge's score says safe; the label is the policy's, not the judge's
            "source": "fallback",
            "error": f"JudgeTruncatedError: {message}",
        }
    )


JUDGE_ERROR_CODES: dict[str, str] = {
    "TimeoutError": "judge_timeout",
    "JudgeBusyError": "judge_busy",
    "InvalidVerdictError": "judge_unparseable",
    "JudgeTruncatedError": "judge_truncated",
}
"""Fixed reasons for a failed judge, by the exception type a fallback verdict's `error` starts with
(`run_judge` writes "Type: message"); any other failure is "judge_error"."""


def judge_error_code(error: str | None) -> str | None:
    """The fixed reason (`judge_error`, `judge_timeout`, `judge_busy`, `judge_unparseable`,
    `judge_truncated`: a safe verdict on a partial view, refused by `on_judge_truncation`) for a
    fallback verdict's `error` text, or None when there is no error.

    What an HTTP client may see instead of the text, which can hold anything
    a judge's backend said (a local path, an upstream error body, a masked key).
    """
    if error is None:
        return None
    kind = error.split(":", 1)[0].strip()
    return JUDGE_ERROR_CODES.get(kind, "judge_error")


def _normalise(raw: Any, threshold: float, name: str) -> Verdict:
    """Turn what a judge returned into a valid `Verdict` (score and label agreeing under `threshold`)."""
    if isinstance(raw, Verdict):
        checked = validated_verdict(raw)  # InvalidVerdictError (a ValueError) -> fallback
        label = checked.label
        if checked.unsafe_score is not None:
            label = label_from_score(checked.unsafe_score, threshold)
        judge_name = checked.judge if checked.judge != "unknown" else name
        # a score under the threshold makes the verdict safe, and a safe verdict names no categories
        categories = checked.categories if label == "unsafe" else []
        return checked.model_copy(update={"label": label, "judge": judge_name, "categories": categories})
    if isinstance(raw, str):
        label = raw.strip().lower()
        if label not in ("safe", "unsafe"):
            raise InvalidVerdictError(
                f"judge {name!r} returned the string {raw[:80]!r}; a label must be 'safe' or 'unsafe'"
            )
        return Verdict(label=label, judge=name)
    # bool is an int, but True/False says nothing about which way is unsafe.
    if isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        score = float(raw)
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise InvalidVerdictError(
                f"judge {name!r} returned the score {raw!r}; a score must be in [0, 1]"
            )
        return Verdict(label=label_from_score(score, threshold), unsafe_score=score, judge=name)
    raise InvalidVerdictError(
        f"judge {name!r} returned a {type(raw).__name__} ({raw!r:.80}); a judge must return a "
        "Verdict, 'safe' / 'unsafe', or an unsafe score (float in [0, 1])"
    )
