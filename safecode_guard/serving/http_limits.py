"""Connection-level limits for `safecode-guard serve`: uvicorn's own, plus a header-read timeout.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and
connections plus requests in flight (`limit_concurrency`: past it new
requests get 503), but not the time a client may take to send its request
line and headers: a client that connects and stays silent, or sends a header
byte now and then, held its socket for ever (1,000 of them used up the
server's sockets for everyone). `guarded_protocol` returns uvicorn's HTTP
protocol class with two additions:

- a header-read timeout: from the moment a connection opens (or a new
  request on a kept-alive connection begins) its request line and headers
  must be complete within `header_timeout_s`, or the server answers 408 and
  closes the connection, before any application code runs;
- a cap on the request line plus headers (`max_header_bytes`; the h11
  parser's `h11_max_incomplete_event_size` is set to the same): past it, 400
  and the connection closes.

Both are checked in the protocol, so they cost an idle client nothing it can
stretch. The request body has its own timeout in the app
(`ServerSettings.body_timeout_s`, 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["guarded_protocol", "uvicorn_limits"]

def _response_408() -> bytes:
    text = b"The request headers took too long to arrive."
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(text)).encode() + b"\r\nconnection: close\r\n\r\n" + text
    )


class _HeaderGuard:
    """The timer and the byte count of one connection's current request head."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def _start_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_bytes = 0
            self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
                self.header_timeout_s, self._header_timed_out
            )

    def _stop_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_response_408())
            self.transport.close()

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes = getattr(self, "_header_bytes", 0) + n
        if self._header_bytes > self.max_header_bytes:
            # raised inside the parser's callback: uvicorn answers 400 and closes the connection
            raise ValueError(f"request line and headers over {self.max_header_bytes} bytes")


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with the header guard."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional for uvicorn
        return _guarded_h11(header_timeout_s, max_header_bytes)

    class GuardedHttpToolsProtocol(_HeaderGuard, HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._start_header_timer()  # the next request on a kept-alive connection

        def on_url(self, url: bytes) -> None:
            self._count_header_bytes(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_header_bytes(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._stop_header_timer()
            super().on_headers_complete()

    GuardedHttpToolsProtocol.header_timeout_s = header_timeout_s
    GuardedHttpToolsProtocol.max_header_bytes = max_header_bytes
    return GuardedHttpToolsProtocol


def _guarded_h11(header_timeout_s: float, max_header_bytes: int) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_HeaderGuard, H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._start_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._start_header_timer()  # a new request begins (h11 bounds its size itself)
            super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # h11 produced a Request event: the headers are complete
                self._stop_header_timer()

    GuardedH11Protocol.header_timeout_s = header_timeout_s
    GuardedH11Protocol.max_header_bytes = max_header_bytes
    return GuardedH11Protocol


def uvicorn_limits(limits: Any) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config` from a `ServerSettings.connections` (`ConnectionLimits`)."""
    return {
        "http": guarded_protocol(limits.header_timeout_s, limits.max_header_bytes),
        "limit_concurrency": limits.max_connections,
        "timeout_keep_alive": limits.keep_alive_s,
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
