"""Pinned policies and your own functions as judges: `FixedJudge`, `CallableJudge`."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SafeCoDeInputError
from ..verdict import Label, Verdict
from .request import JudgeRequest, JudgeResult

__all__ = [
    "CallableJudge",
    "FixedJudge",
]


class FixedJudge:
    """Always the same label: for tests and pinned policies."""

    def __init__(self, label: Label) -> None:
        if label not in ("safe", "unsafe"):
            raise SafeCoDeInputError(
                f"FixedJudge label {label!r} is not a label. Use FixedJudge('safe') or FixedJudge('unsafe')."
            )
        self.label: Label = label
        self.name = f"fixed:{label}"

    def __call__(self, request: JudgeRequest) -> Verdict:
        # No score: a pinned label must not flip under an unusual threshold.
        return Verdict(label=self.label, judge=self.name)

    def __repr__(self) -> str:
        return f"FixedJudge({self.label!r})"


class CallableJudge:
    """Wraps your function `fn(request: JudgeRequest) -> Verdict | "safe" | "unsafe" | float`.

    `request.conversation` / `request.turns` hold the whole conversation (system
    message, earlier turns, tool results); `judge_view(request)` renders it the
    way the built-in judges do.
    """

    def __init__(self, fn: Callable[[JudgeRequest], JudgeResult], name: str | None = None) -> None:
        if not callable(fn):
            raise SafeCoDeInputError(
                f"CallableJudge needs a callable, got a {type(fn).__name__}. Pass a function "
                "taking a JudgeRequest and returning a Verdict, 'safe'/'unsafe' or a score."
            )
        self.fn = fn
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    def __call__(self, request: JudgeRequest) -> JudgeResult:
        return self.fn(request)

    def __repr__(self) -> str:
        return f"CallableJudge({self.fn!r}, name={self.name!r})"
