"""Typed errors.

Every problem with what a caller gave us is a `ValueError` subclass whose
message names the problem and the fix, so callers can catch one family
(`SafeCoDeInputError`) or the plain `ValueError` they already handle.
"""

from __future__ import annotations

__all__ = [
    "ImageInputError",
    "InputLimitError",
    "InvalidVerdictError",
    "JudgeBusyError",
    "JudgeError",
    "OverloadedError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "SafeCoDeError",
    "SafeCoDeInputError",
    "StreamReaderError",
    "UnsupportedContentError",
    "UnsupportedModelError",
]


class SafeCoDeError(Exception):
    """Base class of every error this library raises on purpose."""


class SafeCoDeInputError(SafeCoDeError, ValueError):
    """Something the caller passed cannot be used; the message says how to fix it."""


class ImageInputError(SafeCoDeInputError):
    """An image is corrupt, empty, too large, of an unknown format, or not allowed."""


class InputLimitError(SafeCoDeInputError):
    """A request exceeds a configured limit (images, prompt tokens, settings)."""


class UnsupportedContentError(SafeCoDeInputError):
    """A message or content block has a type or shape this library does not accept."""


class UnsupportedModelError(SafeCoDeInputError):
    """The model or processor lacks something SafeCoDe needs (e.g. a chat template)."""


class JudgeError(SafeCoDeError, RuntimeError):
    """A judge failed and the policy `on_judge_error="raise"` asked for the error."""


class OverloadedError(SafeCoDeError):
    """The model's request queue is full (`BatchingConfig.max_queue`); retry later (HTTP 429)."""


class RequestTimeoutError(SafeCoDeError, TimeoutError):
    """A request ran past its deadline (`timeout_s` or `BatchingConfig.request_timeout_s`; judging,
    queueing, prefill and decoding included)."""


class RequestCancelledError(SafeCoDeError):
    """A request was cancelled (`RequestControl.cancel()`, or its caller went away) before it ended."""


class StreamReaderError(SafeCoDeError, RuntimeError):
    """A second reader tried to read a stream that another thread or task is already reading."""


class InvalidVerdictError(SafeCoDeInputError):
    """A value offered as a `Verdict` (a judge's result, an override, a recorded verdict) is not a valid one."""


class JudgeBusyError(SafeCoDeError, RuntimeError):
    """Every judge worker thread is taken (usually by judges that hung past their timeout)."""
