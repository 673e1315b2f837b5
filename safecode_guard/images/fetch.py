"""Image URLs: SSRF-safe downloads with vetted addresses, no redirects to private hosts, capped decompression."""

from __future__ import annotations

import ipaddress
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import httpx

from ..config import InputPolicy
from ..errors import ImageInputError
from .checks import preview

__all__ = [
    "MAX_REDIRECTS",
    "address_problem",
    "fetch_image_bytes",
]

#: Redirects one image download may follow; each hop's host is checked anew.
MAX_REDIRECTS = 3

# --------------------------------------------------------------------------
# URLs


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_problem(address: str) -> str | None:
    """Why an image URL must not be fetched from `address`, or None if it is public.

    `address`: an IPv4 or IPv6 literal (a "%zone" suffix is ignored). IPv4
    addresses embedded in IPv6 (mapped, 6to4, NAT64) are checked as IPv4.
    Raises `ValueError` if `address` is not an IP literal.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (problem := address_problem(str(embedded))):
            return f"{problem} (IPv4 {embedded} inside {ip})"
    # Order matters only for the message: 127.0.0.1 is also "private".
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),  # not covered by is_global on Python 3.11
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("non-global", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def _resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the default resolver of `fetch_image_bytes`)."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


Resolver = Callable[[str, int], Sequence[str]]


def _vetted_request(client: httpx.Client, url: str, resolve: Resolver) -> httpx.Request:
    """A GET for `url` pinned to a checked public address of its host.

    Connecting to the address we checked (Host header and TLS SNI keep the
    name) closes the gap where DNS answers differently on the second lookup.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ImageInputError(
            f"The image URL {preview(url)} is malformed ({exc}). Check the URL."
        ) from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageInputError(
            f"The image URL {preview(url)} uses the scheme {parsed.scheme!r}; only http and https "
            "are fetched. Download the image yourself and pass its bytes."
        )
    host = parsed.host
    if not host:
        raise ImageInputError(f"The image URL {preview(url)} has no host. Check the URL.")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]  # a literal needs no lookup
    except ValueError:
        addresses = []
    try:
        addresses = addresses or list(resolve(host, port))
    except OSError as exc:
        raise ImageInputError(
            f"Cannot resolve the image host {host!r} ({exc}). Check the URL."
        ) from exc
    if not addresses:
        raise ImageInputError(f"The image host {host!r} resolves to no address. Check the URL.")
    for address in addresses:
        problem = address_problem(address)
        if problem:
            raise ImageInputError(
                f"Refusing to fetch {preview(url)}: its host {host!r} resolves to {address}, a {problem} "
                "address. Image URLs must point to public internet hosts (this blocks server-side "
                "request forgery). Download the image yourself and pass its bytes if you trust it."
            )
    return client.build_request(
        "GET",
        parsed.copy_with(host=addresses[0]),
        # Images are compressed already: ask for them as they are (a server may compress anyway).
        headers={"Host": parsed.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"},
        extensions={"sni_hostname": host} if parsed.scheme == "https" else {},
    )


def _check_deadline(deadline: float, url: str) -> None:
    # httpx's timeout bounds each read; a server trickling bytes needs a total bound too.
    if time.monotonic() > deadline:
        raise ImageInputError(
            f"The download from {preview(url)} took longer than InputPolicy.url_timeout_s and was "
            "stopped. Try again, use a faster host, or raise url_timeout_s."
        )


_PIECE = 1 << 16  # most bytes one decompression step may produce
_ZSTD_MAX_WINDOW = 1 << 23  # the 8 MiB every HTTP zstd decoder must support (RFC 8878); more is refused


def _inflate(chunks: Iterable[bytes], wbits: int | None) -> Iterator[bytes]:
    """zlib-decompress `chunks` in pieces of at most `_PIECE` bytes (gzip, zlib or raw deflate).

    `wbits=None` picks zlib or raw deflate from the first two bytes, as
    browsers do for "deflate". Data after the end of the stream is ignored.
    """
    decompressor, head = None, b""
    for chunk in chunks:
        if decompressor is None:
            head += chunk
            if len(head) < 2:
                continue
            if wbits is None:  # a zlib header: CM=8 and a check value divisible by 31
                zlib_header = head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0
                wbits = zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
            decompressor, chunk = zlib.decompressobj(wbits), head
        data = chunk
        while data and not decompressor.eof:
            piece = decompressor.decompress(data, _PIECE)
            data = decompressor.unconsumed_tail
            if piece:
                yield piece
        if decompressor.eof:
            return
    if decompressor is None:  # fewer than two bytes in all
        decompressor = zlib.decompressobj(wbits or -zlib.MAX_WBITS)
        yield decompressor.decompress(head, _PIECE)
    yield decompressor.flush()


class _ChunkReader:
    """A `read(n)` file view of an iterator of byte chunks (what zstandard's stream reader pulls from)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        cut = len(self._buffer) if size < 0 else size
        out, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return out


def _unzstd(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """zstd-decompress `chunks` (every frame) in pieces of at most `_PIECE` bytes, windows up to 8 MiB."""
    try:
        import zstandard
    except ImportError as exc:
        raise ImageInputError(
            "The server sent the image zstd-compressed (Content-Encoding: zstd) and the `zstandard` "
            "package is not installed. Install it, or download the image yourself and pass its bytes."
        ) from exc
    decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    reader = decompressor.stream_reader(_ChunkReader(chunks), read_across_frames=True)
    try:
        while piece := reader.read(_PIECE):
            yield piece
    except zstandard.ZstdError as exc:
        raise ImageInputError(
            f"The server's zstd-compressed image data is corrupt or needs a window over 8 MiB ({exc}). "
            "Download the image yourself and pass its bytes."
        ) from exc


_DECODERS: dict[str, Callable[[Iterable[bytes]], Iterator[bytes]]] = {
    "gzip": lambda chunks: _inflate(chunks, 16 + zlib.MAX_WBITS),
    "x-gzip": lambda chunks: _inflate(chunks, 16 + zlib.MAX_WBITS),
    "deflate": lambda chunks: _inflate(chunks, None),
    "zstd": _unzstd,
}
_MAX_ENCODINGS = 2


def _content_codings(header: str, url: str) -> list[str]:
    """The Content-Encoding `header`'s codings in the order they were applied ("identity" dropped)."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip() and c.strip().lower() != "identity"]
    unknown = [c for c in codings if c not in _DECODERS]
    if unknown or len(codings) > _MAX_ENCODINGS:
        raise ImageInputError(
            f"The server sent the image at {preview(url)} with Content-Encoding {header!r}; only gzip, "
            f"deflate and zstd are decoded, at most {_MAX_ENCODINGS} deep. Download the image yourself "
            "and pass its bytes."
        )
    return codings


def _capped(chunks: Iterable[bytes], max_bytes: int, deadline: float, url: str) -> Iterator[bytes]:
    """`chunks`, stopped with an error once they pass `max_bytes` in total or the deadline."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise ImageInputError(
                f"The download from {preview(url)} passed the limit of {max_bytes} bytes "
                "(InputPolicy.max_image_bytes) and was stopped. Use a smaller image, or raise max_image_bytes."
            )
        _check_deadline(deadline, url)
        yield chunk


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, url: str) -> bytes:
    """The response body, decompressed by us, stopped at `max_bytes` after every stage.

    The raw body is read (httpx's own decoders produce a whole chunk's output
    at once: 16 KiB of zstd became 1 GB), then each content coding is undone
    in bounded pieces, so a compression bomb stops within 64 KiB of the cap.
    """
    declared = response.headers.get("content-length", "").strip()
    # ASCII digits only ("²".isdigit() is true, and int() refuses it); a 20-digit length is over any cap
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise ImageInputError(
            f"The image at {preview(url)} is {declared[:20]} bytes, over the limit of {max_bytes} "
            "(InputPolicy.max_image_bytes). Use a smaller image, or raise max_image_bytes."
        )
    if response.is_stream_consumed:
        # Built from bytes in-process (httpx.MockTransport in tests): already read and decoded.
        chunks: Iterable[bytes] = _capped([response.content], max_bytes, deadline, url)
        return b"".join(chunks)
    chunks = _capped(response.iter_raw(), max_bytes, deadline, url)
    for coding in reversed(_content_codings(response.headers.get("content-encoding", ""), url)):
        chunks = _capped(_DECODERS[coding](chunks), max_bytes, deadline, url)
    try:
        return b"".join(chunks)
    except zlib.error as exc:
        raise ImageInputError(
            f"The compressed image data from {preview(url)} is corrupt ({exc}). "
            "Download the image yourself and pass its bytes."
        ) from exc


def fetch_image_bytes(
    url: str,
    policy: InputPolicy | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    resolve: Resolver = _resolve,
) -> bytes:
    """Download the bytes at an http(s) `url`, under `policy`'s URL rules.

    Refused unless `policy.allow_image_urls`. Redirects are followed by hand
    (at most `MAX_REDIRECTS`), and before every connection the host is
    resolved and each address checked with `address_problem`. The download is
    streamed and stopped at `policy.max_image_bytes`; `policy.url_timeout_s`
    bounds each network operation and the whole download. Environment proxies
    are ignored on purpose: through a proxy the address check would mean
    nothing. `transport` and `resolve` exist for tests (e.g.
    `httpx.MockTransport`, a fake resolver).
    """
    policy = policy or InputPolicy()
    if not policy.allow_image_urls:
        raise ImageInputError(
            f"Fetching image URLs is off by default, so {preview(url)} was not fetched (a guardrail "
            "should not reach the network unasked). Download the image yourself and pass its bytes, "
            "or set InputPolicy(allow_image_urls=True)."
        )
    deadline = time.monotonic() + policy.url_timeout_s
    with httpx.Client(
        transport=transport, timeout=policy.url_timeout_s, follow_redirects=False, trust_env=False
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            _check_deadline(deadline, url)
            request = _vetted_request(client, url, resolve)
            try:
                response = client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise ImageInputError(
                    f"Cannot fetch the image at {preview(url)} ({type(exc).__name__}: {exc}). "
                    "Check the URL, or download the image yourself and pass its bytes."
                ) from exc
            try:
                location = response.headers.get("location")
                if response.is_redirect and location:  # a relative Location keeps the host
                    url = str(httpx.URL(url).join(location))
                    continue
                if not response.is_success:
                    raise ImageInputError(
                        f"The server at {preview(url)} answered HTTP {response.status_code}. Check the URL."
                    )
                return _read_capped(response, policy.max_image_bytes, deadline, url)
            except httpx.HTTPError as exc:
                raise ImageInputError(
                    f"The download from {preview(url)} failed ({type(exc).__name__}: {exc}). "
                    "Try again, or download the image yourself and pass its bytes."
                ) from exc
            finally:
                response.close()
    raise ImageInputError(
        f"The image URL redirected more than {MAX_REDIRECTS} times (last: {preview(url)}). Use the final image URL."
    )
