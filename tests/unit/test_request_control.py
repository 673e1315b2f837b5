"""`control.RequestControl` alone: deadlines, cancellation, the checks a waiting request makes, and their typed errors.

The same control through the engine, the judge and the scheduler is in
tests/models/test_deadlines_and_cancellation.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from safecode_guard import (
    RequestCancelledError,
    RequestControl,
    RequestTimeoutError,
    SafeCoDeInputError,
)
from safecode_guard.control import checkpoint, current_control, use_control


def test_a_cancel_wakes_a_wait_in_another_thread():
    control = RequestControl()
    event = threading.Event()
    threading.Timer(0.1, control.cancel).start()
    start = time.perf_counter()
    with pytest.raises(RequestCancelledError):
        control.wait(event, timeout=10)
    assert time.perf_counter() - start < 5


def test_a_deadline_ends_a_wait_and_names_its_setting():
    control = RequestControl(timeout_s=0.1, source="timeout_s=0.1")
    with pytest.raises(RequestTimeoutError, match=r"timeout_s=0\.1"):
        control.wait(threading.Event())
    assert control.expired and control.remaining() == 0


def test_a_child_shares_the_parents_cancellation_and_the_earlier_deadline():
    parent = RequestControl(timeout_s=100)
    child = parent.child(timeout_s=1000)
    assert child.deadline == parent.deadline
    assert parent.child(timeout_s=1).deadline < parent.deadline
    calls: list[int] = []
    child.on_cancel(lambda: calls.append(1))
    parent.cancel()
    assert child.cancelled and calls == [1]
    late = RequestControl(parent=parent)  # made after the cancel: born cancelled
    assert late.cancelled
    with pytest.raises(RequestCancelledError):
        late.check()


def test_a_grandchild_hears_of_a_cancel_after_the_middle_control_is_dropped():
    import gc

    root = RequestControl()
    grandchild = root.child().child()  # the middle one (e.g. a preparation thread's) is gone at once
    gc.collect()
    root.cancel()
    assert grandchild.cancelled


def test_cancelling_a_child_leaves_the_parent_alone():
    parent = RequestControl()
    parent.child().cancel()
    assert not parent.cancelled


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "5", True])
def test_a_bad_timeout_is_refused(bad):
    with pytest.raises(SafeCoDeInputError, match="timeout_s"):
        RequestControl(timeout_s=bad)


def test_checkpoint_follows_the_current_control():
    checkpoint()  # no control: nothing to stop
    control = RequestControl()
    with use_control(control):
        assert current_control() is control
        checkpoint()
        control.cancel()
        with pytest.raises(RequestCancelledError):
            checkpoint()
    assert current_control() is None
