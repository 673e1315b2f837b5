"""Polling and process measurements for tests of concurrent work (no test asserts a time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(condition: Callable[[], Any], seconds: float = 20.0) -> bool:
    """Poll `condition` until it is true or `seconds` pass; its last value, as a bool."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
