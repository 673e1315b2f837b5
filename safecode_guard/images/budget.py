"""A process-wide budget for image-decoding memory, shared by every request.

`InputPolicy.max_decode_mb` bounds what decoding ONE image may take, from an
estimate read off its header before any pixel is decoded
(`images.decode_memory_estimate`: format, mode, size; e.g. WEBP about 19
bytes per pixel, RGB about 7). Many requests decode at once (up to
`control.MAX_PREPARING` from asyncio callers, any number from threads), so
each may stay within the per-image cap while together they exhaust the
machine: 16 requests with a 5200x5200 WEBP each took 6 GB.

So every decode first takes its estimate from this budget
(`DEFAULT_DECODE_BUDGET_MB` in all, by default) and gives it back when the
image is decoded and shrunk. A decode that does not fit waits for room, in
arrival order, for up to `max_wait_s` (and never past its request's
deadline; a cancelled request stops waiting); then it is refused with
`OverloadedError` (HTTP 429 with Retry-After): the process is busy, the
image itself is fine. One image larger than the whole budget (a per-image
cap above the budget) waits until nothing else is decoding, then decodes
alone.

    from safecode_guard.images.budget import set_decode_memory_budget
    set_decode_memory_budget(4096, max_wait_s=30)   # or None: no budget
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator

from ..control import current_control
from ..errors import OverloadedError, SafeCoDeInputError

__all__ = [
    "DEFAULT_DECODE_BUDGET_MB",
    "DEFAULT_DECODE_WAIT_S",
    "DecodeMemoryBudget",
    "decode_memory_budget",
    "set_decode_memory_budget",
]

DEFAULT_DECODE_BUDGET_MB = 2048
"""Image-decoding memory all requests of this process may hold at once (four decodes at the default
per-image cap, `InputPolicy.max_decode_mb` = 512)."""
DEFAULT_DECODE_WAIT_S = 10.0
"""Longest a decode waits for room before it is refused with `OverloadedError`."""

_POLL_S = 0.05  # how often a waiting decode checks its request's cancellation


class DecodeMemoryBudget:
    """Bytes of decoding memory, taken by `hold(need)` and given back when its block ends (thread-safe)."""

    def __init__(self, total_mb: int | None = DEFAULT_DECODE_BUDGET_MB, max_wait_s: float = DEFAULT_DECODE_WAIT_S) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()  # waiting decodes, first come first served
        self.used = 0
        """Bytes held by decodes running now."""
        self.peak = 0
        """Most bytes ever held at once (for tests and benchmarks)."""
        self.refused = 0
        self.configure(total_mb, max_wait_s)

    def configure(self, total_mb: int | None, max_wait_s: float = DEFAULT_DECODE_WAIT_S) -> None:
        if total_mb is not None and (isinstance(total_mb, bool) or not isinstance(total_mb, int) or total_mb < 16):
            raise SafeCoDeInputError(
                f"`total_mb` (={total_mb!r}) must be an integer of at least 16 MB, or None for no budget."
            )
        if isinstance(max_wait_s, bool) or not isinstance(max_wait_s, (int, float)) or not 0 <= max_wait_s <= 3600:
            raise SafeCoDeInputError(f"`max_wait_s` (={max_wait_s!r}) must be seconds from 0 to 3600, e.g. 10.")
        with self._cond:
            self.total = None if total_mb is None else total_mb * 2**20
            self.max_wait_s = float(max_wait_s)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, need: int) -> Iterator[None]:
        """Hold `need` bytes of the budget for the block (waiting for room first)."""
        if need <= 0:  # nothing to decode (an image already in memory)
            yield
            return
        self._acquire(need)
        try:
            yield
        finally:
            with self._cond:
                self.used -= need
                self._cond.notify_all()

    def _fits(self, need: int, ticket: object) -> bool:
        if self.total is None:
            return True
        if self._queue[0] is not ticket:
            return False  # first come first served: a large decode is not starved by small ones
        return self.used == 0 or self.used + need <= self.total

    def _acquire(self, need: int) -> None:
        control = current_control()
        ticket = object()
        start = time.perf_counter()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not self._fits(need, ticket):
                    if control is not None:
                        control.check()  # cancelled or past the deadline: stop waiting
                    left = self.max_wait_s - (time.perf_counter() - start)
                    if left <= 0:
                        self.refused += 1
                        raise OverloadedError(
                            f"Decoding this image needs about {need / 2**20:.0f} MB, and the process's image-decoding "
                            f"budget ({(self.total or 0) / 2**20:.0f} MB, {self.used / 2**20:.0f} MB in use) had no room "
                            f"within {self.max_wait_s:g} s. Retry shortly, or raise the budget "
                            "(--decode-budget-mb, safecode_guard.decode_budget.set_decode_memory_budget)."
                        )
                    self._cond.wait(min(left, _POLL_S) if control is not None else left)
                self.used += need
                self.peak = max(self.peak, self.used)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()


decode_memory_budget = DecodeMemoryBudget()
"""The budget every image decode of this process takes from."""


def set_decode_memory_budget(total_mb: int | None, max_wait_s: float = DEFAULT_DECODE_WAIT_S) -> None:
    """Set the process-wide image-decoding budget (None: no budget) and how long a decode may wait for room."""
    decode_memory_budget.configure(total_mb, max_wait_s)
