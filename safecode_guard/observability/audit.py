"""The audit log: one JSON line per decision, written through Python `logging` without ever blocking.

Each `AuditLog` puts its lines on the dedicated logger `safecode_guard.audit`
(which does not propagate to the root logger, so the server log never holds
them twice); a `QueueHandler` hands them to a writer thread (`QueueListener`)
that writes to a size-rotated file, or to stdout for `"-"`. Add your own
handler to that logger to ship every line elsewhere.

A line holds what the decision was and nothing of what the user wrote: the
request's content is a SHA-256 over its text parts and image pixels
(`content_sha256`), enough to correlate a complaint with its line.
`content=True` (`serve --audit-log-content`) adds the text parts.

A write never fails or blocks a request: a full disk or an unwritable path is
counted (`write_errors`, also on `/metrics`) and logged once on
`safecode_guard.observability`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from logging.handlers import QueueHandler, QueueListener, RotatingFileHandler
from pathlib import Path
from typing import Any

from ..errors import SafeCoDeInputError

__all__ = [
    "AUDIT_LOGGER",
    "AuditLog",
    "RequestScope",
    "content_sha256",
    "content_text",
    "current_scope",
    "key_id",
    "note_request_id",
    "request_scope",
    "shared_audit_log",
]

AUDIT_LOGGER = logging.getLogger("safecode_guard.audit")
AUDIT_LOGGER.setLevel(logging.INFO)
AUDIT_LOGGER.propagate = False  # audit lines go to audit handlers, never into the server log

logger = logging.getLogger("safecode_guard.observability")

DEFAULT_MAX_BYTES = 100 * 2**20
DEFAULT_BACKUPS = 10


class AuditLog:
    """Audit lines to a rotating file (`target` a path), stdout (`"-"`) or any `logging.Handler`.

    `content=True` adds the request's text parts to each line (default: only its SHA-256).
    Call `close()` to flush and stop the writer thread (lines queued so far are written).
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | logging.Handler = "-",
        *,
        content: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backup_count: int = DEFAULT_BACKUPS,
    ) -> None:
        self.content = content
        self.write_errors = 0
        self._warned = False
        self._lock = threading.Lock()
        if isinstance(target, logging.Handler):
            handler, self.target = target, repr(target)
        elif str(target) == "-":
            handler, self.target = _CountingStreamHandler(self, sys.stdout), "-"
        else:
            path = Path(target).expanduser()
            self.target = str(path)
            try:  # warn at startup, not at the first request (the request would still be answered)
                with open(path, "a", encoding="utf-8"):
                    pass
            except OSError as exc:
                self._failed(exc)
            # delay=True: a path that cannot be opened now is retried (and counted) at each line
            handler = _CountingFileHandler(self, path, maxBytes=max_bytes, backupCount=backup_count,
                                           encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()  # unbounded: put never blocks
        self._listener = QueueListener(self._queue, handler)
        self._queue_handler = QueueHandler(self._queue)
        me = id(self)
        self._queue_handler.addFilter(lambda record: getattr(record, "audit_log", None) == me)
        AUDIT_LOGGER.addHandler(self._queue_handler)
        self._listener.start()
        self._closed = False

    def write(self, line: Mapping[str, Any]) -> None:
        """Queue one line (a JSON object); never raises."""
        try:
            text = json.dumps(line, separators=(",", ":"), ensure_ascii=False, default=str)
            AUDIT_LOGGER.info(text, extra={"audit_log": id(self)})
        except Exception as exc:  # a line that cannot be written must not fail the request
            self._failed(exc)

    def close(self) -> None:
        """Write what is queued, stop the writer thread and detach from the logger (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        AUDIT_LOGGER.removeHandler(self._queue_handler)
        self._listener.stop()
        self._handler.close()

    def _failed(self, exc: BaseException | None) -> None:
        with self._lock:
            self.write_errors += 1
            first = not self._warned
            self._warned = True
        if first:
            logger.error(
                "the audit log %s cannot be written (%s: %s); requests are still answered, and failed lines "
                "are counted (safecode_audit_write_errors on /metrics). Fix the path or free disk space.",
                self.target, type(exc).__name__ if exc else "error", exc,
            )

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CountingFileHandler(RotatingFileHandler):
    def __init__(self, owner: AuditLog, *args: Any, **kwargs: Any) -> None:
        self._owner = owner
        super().__init__(*args, **kwargs)

    def handleError(self, record: logging.LogRecord) -> None:
        self._owner._failed(sys.exc_info()[1])
        if self.stream is not None:  # a broken stream is reopened at the next line
            with contextlib.suppress(Exception):
                self.stream.close()
            self.stream = None  # type: ignore[assignment]


class _CountingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, owner: AuditLog, stream: Any) -> None:
        self._owner = owner
        super().__init__(stream)

    def handleError(self, record: logging.LogRecord) -> None:
        self._owner._failed(sys.exc_info()[1])


_SHARED: dict[str, AuditLog] = {}
_SHARED_LOCK = threading.Lock()


def shared_audit_log(target: str | os.PathLike[str] | AuditLog, *, content: bool = False) -> AuditLog:
    """The process's one `AuditLog` for a path (or "-"), opened on first use and closed at exit;
    an `AuditLog` is returned as it is. Settings that name a path (a chat model's, a NeMo
    config's) share one writer per file, so two of them never rotate the same file."""
    if isinstance(target, AuditLog):
        return target
    key = str(target) if str(target) == "-" else str(Path(target).expanduser().resolve())
    with _SHARED_LOCK:
        log = _SHARED.get(key)
        if log is None:
            log = _SHARED[key] = AuditLog(key, content=content)
            atexit.register(log.close)  # the lines still queued are written
        elif log.content != content:
            raise SafeCoDeInputError(
                f"The audit log {key} is already open with content={log.content}; one file takes one "
                f"setting. Give the same `audit_log_content` everywhere, or another path."
            )
        return log


# --------------------------------------------------------------------------- what a line holds


def key_id(api_key: str | None) -> str | None:
    """A short, stable identity for an API key (the first 12 hex digits of its SHA-256); None for none."""
    if not api_key:
        return None
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def content_sha256(messages: Sequence[Any]) -> str:
    """SHA-256 over a request's messages: roles, text parts and image pixels (size, mode, bytes), in order.

    The same messages always give the same digest; nothing of them can be read back from it.
    """
    digest = hashlib.sha256()
    _feed(digest, messages, 0)
    return digest.hexdigest()


def _feed(digest: Any, value: Any, depth: int) -> None:
    if depth > 64:  # messages are validated elsewhere; never recurse without bound here
        digest.update(b"\x00deep")
        return
    if isinstance(value, str):
        digest.update(b"s" + value.encode("utf-8", "surrogatepass") + b"\x00")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        digest.update(b"b" + bytes(value) + b"\x00")
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(str(key).encode("utf-8", "surrogatepass") + b"=")
            _feed(digest, value[key], depth + 1)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item, depth + 1)
        digest.update(b"]")
    elif hasattr(value, "tobytes") and hasattr(value, "size") and hasattr(value, "mode"):  # a PIL image
        digest.update(f"i{value.size}{value.mode}".encode() + value.tobytes() + b"\x00")
    else:
        digest.update(b"r" + repr(value).encode("utf-8", "surrogatepass") + b"\x00")


def content_text(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The text of a request for an opted-in audit line: each message's role and text parts, images as `[image]`."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            text = content
        else:
            text = "\n".join(_part_text(part) for part in content or [] if isinstance(part, Mapping))
        out.append({"role": str(message.get("role")), "text": text})
    return out


def _part_text(part: Mapping[str, Any]) -> str:
    kind = str(part.get("type"))
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    return "[image]" if "image" in kind else f"[{kind}]"


# --------------------------------------------------------------------------- the request's scope


@dataclass
class RequestScope:
    """What a caller (the server) knows of a request that the engine does not: set for its duration.

    `audit` replaces the engine's own audit log; `observers` are called with the
    finished request's summary (the server's metrics).
    """

    audit: AuditLog | None = None
    request_id: str | None = None
    api_key_id: str | None = None
    observers: list[Callable[[Mapping[str, Any]], None]] = field(default_factory=list)


_SCOPE: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("safecode_request_scope", default=None)


def current_scope() -> RequestScope | None:
    return _SCOPE.get()


@contextlib.contextmanager
def request_scope(scope: RequestScope) -> Iterator[RequestScope]:
    """Make `scope` current: engine requests started inside (threads they start too) report to it."""
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def note_request_id(request_id: str) -> None:
    """Name the current request (e.g. the completion id a server sends back), for its audit line."""
    scope = _SCOPE.get()
    if scope is not None:
        scope.request_id = request_id
