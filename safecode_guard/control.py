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
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .errors import RequestCancelledError, RequestTimeoutError, SafeCoDeInputError

__all__ = ["RequestControl", "checked_timeout", "checkpoint", "current_control", "use_control"]


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
