"""One request's deadline and cancellation: `RequestControl`.

A request waits in several places before its answer is done: for a
preparation thread (images, the prompt), for its judge (a thread of its own,
or the self judge's prefill in the model's scheduler), for a place in the
batch, for its prefill and for each decoded token. One `RequestControl`
carries the request's deadline and its cancellation through all of them:

- every wait is bounded by the deadline and wakes when the control is
  cancelled (the request then raises `RequestTimeoutError` or
  `RequestCancelledError`; a deadline is never a judge failure to fall back
  from);
- the model's scheduler drops a cancelled or expired request from its queue,
  skips its prefill (a self judge's prefill job too), and removes its rows from
  the batch at the next decode step;
- work that cannot be interrupted (a chat judge's thread, an image decoder)
  is no longer waited for, and notices at its next `checkpoint()`.

The control reaches deep call sites through a context variable
(`current_control()`), which the engine sets around each request's
preparation thread and which `contextvars.copy_context()` carries into judge
threads, so no signature needs an extra parameter.

    control = RequestControl(timeout_s=5)
    result = engine.generate(messages, control=control)   # or timeout_s=5
    control.cancel()                                      # from any thread

`SafeCoDe.agenerate` / `astream` cancel their request when the asyncio task
awaiting them is cancelled. Times are `time.perf_counter()` seconds.

`run_briefly` / `arun_briefly` run one piece of a request's work (preparing
it, loading a model) in a short-lived thread under its control, so the caller
stops waiting the moment the request is cancelled or runs out of time, and
asyncio callers never block their event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from .errors import RequestCancelledError, RequestTimeoutError, SafeCoDeInputError

__all__ = [
    "MAX_PREPARING",
    "RequestControl",
    "arun_briefly",
    "cancelled_error",
    "checked_timeout",
    "checkpoint",
    "current_control",
    "run_briefly",
    "use_control",
]

T = TypeVar("T")


class RequestControl:
    """The deadline and the cancellation of one request (thread-safe; cancel from anywhere).

    `timeout_s` starts counting now. `parent`: this control is cancelled when
    the parent is, and its deadline is never later than the parent's (a call
    inside a request, e.g. a caption for the judge, gets a child control).
    `source` names the setting the timeout came from, for the error message.
    """

    def __init__(
        self,
        timeout_s: float | None = None,
        *,
        parent: RequestControl | None = None,
        source: str = "timeout_s",
    ) -> None:
        timeout_s = checked_timeout(timeout_s)
        self.started = time.perf_counter()
        own = None if timeout_s is None else self.started + float(timeout_s)
        inherited = parent.deadline if parent is not None else None
        self.deadline: float | None = own if inherited is None else (inherited if own is None else min(own, inherited))
        """When the request times out (`time.perf_counter()` seconds), or None."""
        if own is not None and (inherited is None or own <= inherited):
            self.timeout_s, self.source = timeout_s, source
        elif parent is not None:
            self.timeout_s, self.source = parent.timeout_s, parent.source
        else:
            self.timeout_s, self.source = None, source
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._wakers: set[threading.Event] = set()
        self._callbacks: list[Callable[[], None]] = []
        self._children: weakref.WeakSet[RequestControl] = weakref.WeakSet()
        # A child holds its parent (the parent holds its children weakly): a chain stays alive as
        # long as its innermost control, e.g. the one a queued job carries, is in use.
        self._parent = parent
        if parent is not None:
            parent._adopt(self)

    # -- state -----------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    @property
    def done(self) -> bool:
        """Cancelled or past the deadline: nothing more should be done for this request."""
        return self.cancelled or self.expired

    def remaining(self) -> float | None:
        """Seconds left before the deadline (0 once past it), or None without a deadline."""
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def check(self) -> None:
        """Raise `RequestCancelledError` / `RequestTimeoutError` when the request should stop."""
        if self.cancelled:
            raise RequestCancelledError(
                "The request was cancelled (its caller went away or called cancel()); nothing more is done for it."
            )
        if self.expired:
            raise self.timeout_error()

    def timeout_error(self, detail: str = "") -> RequestTimeoutError:
        extra = f"; {detail}" if detail else ""
        return RequestTimeoutError(
            f"The request took longer than its timeout of {self.timeout_s:g} s ({self.source}; judging, "
            f"queueing, prefill and decoding included{extra}). Ask for fewer tokens, retry when the model is "
            "less busy, or raise the timeout."
        )

    # -- cancelling ------------------------------------------------------------------------

    def cancel(self) -> None:
        """Cancel the request (idempotent, any thread): every wait on it wakes and raises."""
        with self._lock:
            if self._cancelled.is_set():
                return
            self._cancelled.set()
            wakers, callbacks, children = list(self._wakers), self._callbacks, list(self._children)
            self._callbacks = []
        for event in wakers:
            event.set()
        for callback in callbacks:
            callback()
        for child in children:
            child.cancel()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` when the request is cancelled (at once if it already is).

        Returns a function that unregisters it (call it once the work it would stop is over).
        """
        with self._lock:
            if not self._cancelled.is_set():
                self._callbacks.append(callback)
                return lambda: self._forget(callback)
        callback()
        return lambda: None

    def _forget(self, callback: Callable[[], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def _adopt(self, child: RequestControl) -> None:
        with self._lock:
            if not self._cancelled.is_set():
                self._children.add(child)
                return
        child.cancel()

    def child(self, timeout_s: float | None = None, source: str = "timeout_s") -> RequestControl:
        return RequestControl(timeout_s, parent=self, source=source)

    # -- waiting ---------------------------------------------------------------------------

    def wait(self, event: threading.Event, timeout: float | None = None) -> bool:
        """Wait for `event` up to `timeout` seconds (None: no limit of its own), waking on cancellation.

        Returns whether `event` is set; raises `RequestCancelledError` /
        `RequestTimeoutError` when the request was cancelled or ran past its deadline first.
        """
        with self._lock:
            self._wakers.add(event)
        try:
            limit = timeout
            remaining = self.remaining()
            if remaining is not None:
                limit = remaining if limit is None else min(limit, remaining)
            if not self._cancelled.is_set():
                event.wait(limit)
        finally:
            with self._lock:
                self._wakers.discard(event)
        self.check()
        return event.is_set()

    def wait_future(self, future: Any, timeout: float | None = None) -> Any:
        """The result of a `concurrent.futures.Future`, waiting as `wait` does (TimeoutError after `timeout`)."""
        ready = threading.Event()
        future.add_done_callback(lambda _: ready.set())
        if not self.wait(ready, timeout):
            raise TimeoutError("no result within the timeout")
        return future.result()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "expired" if self.expired else "live"
        left = self.remaining()
        return f"RequestControl({state}, remaining={'none' if left is None else f'{left:.3f}s'})"


def checked_timeout(value: Any) -> float | None:
    """`value` as seconds (None: no deadline); anything but a positive finite number is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise SafeCoDeInputError(f"`timeout_s` (={value!r}) must be positive seconds, or None for no deadline.")
    return float(value)


# --------------------------------------------------------------------------- the current request

_CURRENT: contextvars.ContextVar[RequestControl | None] = contextvars.ContextVar(
    "safecode_request_control", default=None
)


def current_control() -> RequestControl | None:
    """The control of the request this code runs for (set by the engine), or None."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_control(control: RequestControl | None) -> Iterator[RequestControl | None]:
    """Make `control` the current one in this context (threads started with a copy inherit it)."""
    token = _CURRENT.set(control)
    try:
        yield control
    finally:
        _CURRENT.reset(token)


def checkpoint() -> None:
    """Stop here (raise) if the current request was cancelled or ran past its deadline.

    Long preparation loops (messages, images) call it between items, so a
    departed client's work stops at the next item rather than running to the end.
    """
    control = _CURRENT.get()
    if control is not None:
        control.check()


# --------------------------------------------------------------------------- work in a short-lived thread

# Request preparation (the processor, the noised copy) runs torch's parallel CPU kernels. With
# GNU OpenMP a thread that ran one keeps a thread team for as long as it lives, and once a
# process holds more OpenMP threads than cores every team's spin-wait is throttled: with 8
# long-lived caller threads on 2 cores the scheduler's decode steps took 40-60% longer. So
# preparation runs in a short-lived thread of its own, and callers' threads never join OpenMP.
MAX_PREPARING = 32
"""Requests prepared at once from asyncio callers; more wait (threads are never piled up)."""
_ASYNC_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _run_with(control: RequestControl | None, fn: Callable[[], T]) -> T:
    if control is None:
        return fn()
    with use_control(control):
        control.check()
        return fn()


def run_briefly(fn: Callable[[], T], *, control: RequestControl | None = None) -> T:
    """`fn()` in a thread that ends with it (the caller's context goes along); its result or error.

    With `control`, `fn` runs with it as the current request control, and the
    caller stops waiting when the control is cancelled or its deadline passes
    (raising `RequestCancelledError` / `RequestTimeoutError`); the control is
    then cancelled, so `fn` stops at its next checkpoint and anything it queued is dropped.
    """
    context = contextvars.copy_context()
    box: list[Any] = []
    finished = threading.Event()

    def work() -> None:
        try:
            box.append((True, context.run(_run_with, control, fn)))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))
        finally:
            finished.set()

    thread = threading.Thread(target=work, name="safecode-prepare", daemon=True)
    thread.start()
    if control is None:
        thread.join()
    else:
        try:
            control.wait(finished)
        except BaseException:
            control.cancel()
            raise
        thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value


async def arun_briefly(fn: Callable[[], T], *, control: RequestControl | None = None) -> T:
    """`run_briefly` for asyncio: the event loop stays free while `fn` runs.

    `fn` runs under a control of its own (a child of `control`, or of the
    current one): it is cancelled when the awaiting task is cancelled, and the
    wait ends at the deadline (`RequestTimeoutError`) or when the control is
    cancelled from another thread (`RequestCancelledError`).
    """
    loop = asyncio.get_running_loop()
    slots = _ASYNC_SLOTS.get(loop)
    if slots is None:
        slots = _ASYNC_SLOTS[loop] = asyncio.Semaphore(MAX_PREPARING)
    own = RequestControl(parent=control if control is not None else current_control())
    context = contextvars.copy_context()
    deadline = asyncio.timeout(own.remaining())
    try:
        async with deadline, slots:
            own.check()
            future: asyncio.Future[T] = loop.create_future()

            def work() -> None:
                try:
                    result = context.run(_run_with, own, fn)
                except BaseException as exc:
                    loop.call_soon_threadsafe(_settle, future, None, exc)
                else:
                    loop.call_soon_threadsafe(_settle, future, result, None)

            def cancelled() -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(_settle, future, None, cancelled_error())

            forget = own.on_cancel(cancelled)
            try:
                threading.Thread(target=work, name="safecode-prepare", daemon=True).start()
                return await future
            finally:
                forget()
    except TimeoutError:
        own.cancel()
        if not deadline.expired():  # a TimeoutError of the work itself (e.g. its own RequestTimeoutError)
            raise
        raise own.timeout_error() from None
    except BaseException:
        own.cancel()  # the awaiting task was cancelled (or the work failed): stop what is left
        raise


def cancelled_error() -> RequestCancelledError:
    """The error a cancelled request raises where it waited."""
    return RequestCancelledError("The request was cancelled; nothing more is done for it.")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
