"""Typed errors: every error this library raises on purpose, and the one "did you mean" helper.

Every problem with what a caller gave us is a `ValueError` subclass whose
message names the problem and the fix, so callers can catch one family
(`SafeCoDeInputError`) or the plain `ValueError` they already handle.
Everything here is a `SafeCoDeError`. Grouped by where it is raised: input,
models, judges, requests, the HTTP server, NeMo Guardrails, evaluation.

Two NeMo errors live in `safecode_guard.nemo.errors` instead:
`ConfiguredModelError` and `ClientModelError` are also NeMo's own
`ModelInitializationError` (so NeMo's server answers them with HTTP 400), and
NeMo Guardrails is an optional dependency that this module must not import.
They are `SafeCoDeError`s too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "APIError",
    "DatasetLayoutError",
    "DemoModelUnavailableError",
    "GraderError",
    "HubUnreachableError",
    "ImageInputError",
    "InputLimitError",
    "InvalidVerdictError",
    "JSONBudgetError",
    "JudgeBusyError",
    "JudgeError",
    "JudgeTruncatedError",
    "ModelNotFoundError",
    "NemoConfigError",
    "OverloadedError",
    "RequestCancelledError",
    "RequestOptionError",
    "RequestShapeError",
    "RequestTimeoutError",
    "ResumeMismatchError",
    "SafeCoDeError",
    "SafeCoDeInputError",
    "StreamReaderError",
    "UnsupportedContentError",
    "UnsupportedGuardError",
    "UnsupportedModelError",
    "UnsupportedSchemaError",
    "did_you_mean",
]


def did_you_mean(word: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The choice closest to `word` (difflib's similarity ratio at least `cutoff`), or None.

    What every error message that names a typo suggests ("`judgee`: did you mean `judge`?").
    """
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None


class SafeCoDeError(Exception):
    """Base class of every error this library raises on purpose."""


# --------------------------------------------------------------------------- bad input


class SafeCoDeInputError(SafeCoDeError, ValueError):
    """Something the caller passed cannot be used; the message says how to fix it."""

    param: str | None = None
    """The request field at fault, where one is (the server sends it as OpenAI's error `param`)."""
    code: str | None = None
    """An OpenAI-style error code where one fits better than the class name (`integer_above_max_value`)."""


class ImageInputError(SafeCoDeInputError):
    """An image is corrupt, empty, too large, of an unknown format, or not allowed."""


class InputLimitError(SafeCoDeInputError):
    """A request exceeds a configured limit (images, prompt tokens, settings)."""


class UnsupportedContentError(SafeCoDeInputError):
    """A message or content block has a type or shape this library does not accept."""


class InvalidVerdictError(SafeCoDeInputError):
    """A value offered as a `Verdict` (a judge's result, an override, a recorded verdict) is not a valid one."""


# --------------------------------------------------------------------------- models


class UnsupportedModelError(SafeCoDeInputError):
    """The model or processor lacks something SafeCoDe needs (e.g. a chat template)."""


class UnsupportedSchemaError(SafeCoDeInputError):
    """A JSON schema (structured output, tool parameters) cannot be compiled into a decoding grammar.

    `keywords` names the schema keywords the grammar library does not implement
    (empty when the problem is elsewhere, e.g. a `$ref` that points nowhere).
    """

    def __init__(self, message: str, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keywords = keywords


class ModelNotFoundError(UnsupportedModelError):
    """The model named is not there: no such folder, or no such hub id (or not in the offline cache)."""


class HubUnreachableError(ModelNotFoundError):
    """A hub id was given, the hub cannot be reached, and the model is not in the local cache."""


class UnsupportedGuardError(UnsupportedModelError):
    """The model named as a guard is not one of the supported guard families."""


class DemoModelUnavailableError(SafeCoDeError):
    """The demo model cannot be built here: a source package is missing or the cache is not writable."""


# --------------------------------------------------------------------------- judges


class JudgeError(SafeCoDeError, RuntimeError):
    """A judge failed and the policy `on_judge_error="raise"` asked for the error."""


class JudgeTruncatedError(JudgeError):
    """A judge saw only part of what the model reads (its budget was too small), and the policy
    `on_judge_truncation="raise"` asked for the error instead of a verdict."""


class JudgeBusyError(SafeCoDeError, RuntimeError):
    """Every judge worker thread is taken (usually by judges that hung past their timeout)."""


# --------------------------------------------------------------------------- requests


class OverloadedError(SafeCoDeError):
    """The model's request queue is full (`BatchingConfig.max_queue`); retry later (HTTP 429)."""


class RequestTimeoutError(SafeCoDeError, TimeoutError):
    """A request ran past its deadline (`timeout_s` or `BatchingConfig.request_timeout_s`; judging,
    queueing, prefill and decoding included)."""


class RequestCancelledError(SafeCoDeError):
    """A request was cancelled (`RequestControl.cancel()`, or its caller went away) before it ended."""


class StreamReaderError(SafeCoDeError, RuntimeError):
    """A second reader tried to read a stream that another thread or task is already reading."""


# --------------------------------------------------------------------------- the HTTP server


class APIError(SafeCoDeError):
    """An error with its HTTP status and OpenAI error fields, raised inside the server's app."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


class JSONBudgetError(SafeCoDeInputError):
    """A request body is not valid JSON, or is over the structure budget; `code` names which."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- NeMo Guardrails


class NemoConfigError(SafeCoDeInputError):
    """A NeMo config asks for something the safecode integration cannot do; raised while `LLMRails` is built."""


class RequestOptionError(SafeCoDeInputError):
    """A NeMo request sets an option the `safecode` engine does not take from requests."""

    status_code = 400
    """NeMo's server answers a failed model call with the `status_code` of its cause."""


class RequestShapeError(SafeCoDeInputError):
    """A NeMo request holds messages the config cannot answer as sent (e.g. two user turns in Colang 2.x)."""

    status_code = 400


# --------------------------------------------------------------------------- evaluation


class DatasetLayoutError(SafeCoDeInputError):
    """A data folder or file does not match the layout of its format."""


class ResumeMismatchError(SafeCoDeInputError):
    """`<out>` holds results made with other settings, so resuming would mix them."""


class GraderError(SafeCoDeError, ValueError):
    """The grader's answer held no grade (the runner then keeps the phrase decision)."""
