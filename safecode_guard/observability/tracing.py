"""OpenTelemetry spans for SafeCoDe requests; optional (`pip install safecode-guard[otel]`).

Spans go to the tracer provider the application configured (OpenTelemetry's
global one), or to the one given to `use_tracer_provider`. Without the
`opentelemetry-api` package, or with no provider configured (the API's own
no-op), nothing is recorded: `start_span` returns None after one cheap
check, and the engine then builds no span, no attribute and no timestamp.

Span names and attributes follow OpenTelemetry's GenAI semantic conventions
(`gen_ai.*`, spelled out here: the conventions' Python constants live in a
private, incubating module) plus SafeCoDe's own `safecode.*`. No user text,
image or exception message ever goes into a span: errors are recorded by
their type (`error.type`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

try:  # optional: the library works without OpenTelemetry
    from opentelemetry import trace as otel_trace
except ImportError:  # pragma: no cover - exercised only where the extra is absent
    otel_trace = None

if TYPE_CHECKING:
    from ..verdict import Verdict

__all__ = [
    "TRACER_NAME",
    "Clock",
    "child_span",
    "judge_span",
    "start_span",
    "tracing_available",
    "use_tracer_provider",
    "verdict_attributes",
]

TRACER_NAME = "safecode_guard"
PROVIDER_NAME = "safecode_guard"
"""`gen_ai.provider.name`: a local model served by this library (no well-known value fits)."""

_provider: Any = None  # set by use_tracer_provider; None: OpenTelemetry's global provider
_tracers: dict[int, Any] = {}


def tracing_available() -> bool:
    """Whether `opentelemetry-api` is installed (spans can be recorded once a provider is configured)."""
    return otel_trace is not None


def use_tracer_provider(provider: Any) -> None:
    """Send SafeCoDe's spans to `provider` (an SDK `TracerProvider`) instead of the global one; None: back
    to the global one. For tests and for applications that keep several providers."""
    global _provider
    _provider = provider
    _tracers.clear()


def _tracer() -> Any:
    if otel_trace is None:
        return None
    if _provider is None and isinstance(otel_trace.get_tracer_provider(), otel_trace.ProxyTracerProvider):
        return None  # no provider configured (yet): the API's no-op, without building a span to find out
    key = id(_provider)
    tracer = _tracers.get(key)
    if tracer is None:
        # the package's own __init__ may still be importing (the engine imports this module)
        from .. import __version__

        # the global provider's tracer is a proxy: it follows a provider configured later
        source = _provider if _provider is not None else otel_trace.get_tracer_provider()
        tracer = _tracers[key] = source.get_tracer(TRACER_NAME, __version__)
    return tracer


def start_span(name: str, *, kind: str = "INTERNAL", context: Any = None) -> Any:
    """A started span under the current (or given) context, or None when nothing would record it.

    The caller ends it. None is the tracing-off path: no attributes are built.
    """
    tracer = _tracer()
    if tracer is None:
        return None
    span = tracer.start_span(name, context=context, kind=getattr(otel_trace.SpanKind, kind))
    if not span.is_recording():
        return None
    return span


def child_span(parent: Any, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None) -> None:
    """A finished child of `parent` from `start_ns` to `end_ns` (epoch nanoseconds): a stage of a request
    recorded after the fact from its own timeline, so the scheduler's loop never touches a span."""
    tracer = _tracer()
    context = otel_trace.set_span_in_context(parent)
    span = tracer.start_span(name, context=context, start_time=start_ns, attributes=attributes)
    span.end(end_time=max(end_ns, start_ns))


@contextlib.contextmanager
def use_span(span: Any) -> Iterator[None]:
    """Make `span` current (spans started inside become its children); no-op for None."""
    if span is None:
        yield
        return
    with otel_trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield


@contextlib.contextmanager
def judge_span(judge: str) -> Iterator[Any]:
    """A live `safecode.judge` span when the current span records (a traced request), else None.

    The caller adds the verdict's attributes (`verdict_attributes`).
    """
    if otel_trace is None or not otel_trace.get_current_span().is_recording():
        yield None
        return
    span = start_span("safecode.judge")
    if span is None:
        yield None
        return
    span.set_attribute("safecode.judge", judge)
    try:
        yield span
    except BaseException as exc:
        mark_error(span, exc)
        raise
    finally:
        span.end()


def mark_error(span: Any, exc: BaseException) -> None:
    """Record a failure by its type only (an exception's text may quote the request)."""
    span.set_attribute("error.type", type(exc).__name__)
    span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, type(exc).__name__))


def verdict_attributes(verdict: Verdict) -> dict[str, Any]:
    """The `safecode.*` attributes of a verdict (no caption: it describes the user's image)."""
    # judges (and their guard models) load only when a traced request needs the code
    from ..judges import judge_error_code

    attrs: dict[str, Any] = {
        "safecode.verdict": verdict.label,
        "safecode.judge": verdict.judge,
        "safecode.source": verdict.source,
    }
    if verdict.unsafe_score is not None:
        attrs["safecode.unsafe_score"] = float(verdict.unsafe_score)
    if verdict.categories:
        attrs["safecode.categories"] = list(verdict.categories)
    if verdict.error is not None:
        attrs["safecode.judge_error"] = judge_error_code(verdict.error) or "judge_error"
    return attrs


def request_attributes(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """GenAI request attributes for a chat call with engine `options` (only those set)."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAME,
        "gen_ai.request.model": model,
    }
    names = {
        "max_new_tokens": "gen_ai.request.max_tokens",
        "temperature": "gen_ai.request.temperature",
        "top_p": "gen_ai.request.top_p",
        "top_k": "gen_ai.request.top_k",
        "seed": "gen_ai.request.seed",
        "presence_penalty": "gen_ai.request.presence_penalty",
        "frequency_penalty": "gen_ai.request.frequency_penalty",
    }
    for option, attr in names.items():
        value = options.get(option)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            attrs[attr] = value
    stop = options.get("stop")
    if stop:
        # stop strings are the application's settings, not the user's message
        attrs["gen_ai.request.stop_sequences"] = [stop] if isinstance(stop, str) else [str(s) for s in stop]
    return attrs


class Clock:
    """Epoch nanoseconds for `time.perf_counter()` readings (the scheduler's timeline), anchored once."""

    __slots__ = ("ns", "perf")

    def __init__(self) -> None:
        self.ns, self.perf = time.time_ns(), time.perf_counter()

    def to_ns(self, perf: float) -> int:
        return self.ns + int((perf - self.perf) * 1e9)
