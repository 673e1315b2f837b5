"""Every image a user gives us becomes a PIL RGB image here, safely and within bounded memory and time.

This module is the pipeline (`load_image`, `load_images`, base64 and data
URLs); the steps live beside it: `checks` (byte and pixel caps, request
totals, sniffing), `formats` (structure walks per format), `decode` (header
checks, decode memory, conversion, downscaling, orientation), `local`
(files beneath a root folder), `fetch` (SSRF-safe downloads), `budget` (the
process-wide decode-memory budget) and `sides` (the working size a
processor needs).

Input flow (`load_image` for one image, `load_images` for a request's images):

1. Read, never decode: a `PIL.Image.Image` is taken as is; `bytes` /
   `bytearray` / `memoryview` are encoded file bytes; a `str` is a `data:`
   URL, an `http(s)://` URL (only with `InputPolicy.allow_image_urls`), a
   `file://` URL or a local path (only with `InputPolicy.allow_local_files`),
   or bare base64; a `pathlib.Path` / any `os.PathLike` follows the local file
   rules. Downloads count decompressed bytes as they are produced; local files
   are opened one path component at a time beneath the root folder.
2. Check before decoding (`open_image_bytes`): byte cap -> the format's
   framing walked with a bounded number of steps (`structure_problem`: JPEG
   scans and segments, PNG chunks, GIF blocks, TIFF tags, strips and tiles,
   BMP RLE size) -> the header opened by Pillow's plugin for `ALLOWED_FORMATS` only ->
   pixel caps (ours and Pillow's own) from the header. `load_images` first
   counts the images, then reads and checks all of them, with the request's
   totals (bytes, declared pixels), before decoding any.
3. Decode small: JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg when
   the working size allows (`Image.draft`); every image is downscaled to at
   most `max_side` pixels on its longer side (`InputPolicy.max_working_side`,
   lowered by the caller to what its processor needs: `image_working_side`)
   right after decoding, before mode conversion (`to_rgb`) or the EXIF
   orientation copy its pixels.

Output: a new, fully loaded `PIL.Image.Image` of mode "RGB", or an
`ImageInputError` (a `ValueError`) whose message names the problem and the
fix; request-wide limits give `InputLimitError`. No process-wide lock: a slow
decode never holds up another thread's images, and Python's warning filters
are never touched.

Bounds per image (default policy): the encoded bytes (25 MB) plus the decoded
frame at full size (at most 4 bytes per pixel, 40 M pixels: 160 MB; 16-bit and
float TIFFs 4 bytes per pixel; a progressive JPEG also holds libjpeg's
coefficient buffer, up to 6 bytes per pixel before scaling) plus the working
copy (`3 * max_side**2` bytes).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageFile

from ..config import InputPolicy
from ..control import checkpoint
from ..errors import ImageInputError
from .budget import decode_memory_budget
from .checks import (
    ACCEPTED_KINDS,
    ALLOWED_FORMATS,
    check_encoded_size,
    check_pixels,
    check_request_totals,
    fit_within,
    preview,
    sniff,
)
from .decode import (
    check_decode_memory,
    check_pil,
    decode_image_bytes,
    decode_memory_estimate,
    decode_opened,
    decode_pil,
    open_image_bytes,
    to_rgb,
    working_side,
)
from .fetch import MAX_REDIRECTS, address_problem, fetch_image_bytes
from .formats import (
    MAX_BMP_RLE_BYTES,
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    MAX_TIFF_BLOCKS,
    MAX_TIFF_TAGS,
    jpeg_counts,
    structure_problem,
)
from .local import file_url_to_path, read_local_file
from .sides import WORKING_SIDE_MARGIN, image_working_side, processor_sides

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_BMP_RLE_BYTES",
    "MAX_GIF_BLOCKS",
    "MAX_JPEG_SCANS",
    "MAX_JPEG_SEGMENTS",
    "MAX_PNG_CHUNKS",
    "MAX_REDIRECTS",
    "MAX_TIFF_BLOCKS",
    "MAX_TIFF_TAGS",
    "WORKING_SIDE_MARGIN",
    "address_problem",
    "check_decode_memory",
    "check_encoded_size",
    "check_pixels",
    "decode_base64",
    "decode_image_bytes",
    "decode_memory_estimate",
    "fetch_image_bytes",
    "fit_within",
    "image_working_side",
    "jpeg_counts",
    "load_image",
    "load_images",
    "open_image_bytes",
    "parse_data_url",
    "processor_sides",
    "read_local_file",
    "structure_problem",
    "to_rgb",
]

# --------------------------------------------------------------------------
# Strings: base64, data URLs


_B64_RE = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_B64_BAD_CHAR = re.compile(r"[^A-Za-z0-9+/=]")


def decode_base64(text: str, max_bytes: int | None = None) -> bytes:
    """Decode standard base64 (whitespace and missing padding tolerated).

    With `max_bytes`, a string that would decode to more is refused from its
    length alone, before decoding.
    """
    compact = "".join(text.split())
    if not compact:
        raise ImageInputError(
            "The base64 image data is empty. Give the base64 encoding of a PNG, JPEG, GIF, WEBP, BMP or TIFF file."
        )
    if not _B64_RE.fullmatch(compact):
        bad = _B64_BAD_CHAR.search(compact)
        where = (
            f"{bad.group()!r} at position {bad.start()}" if bad else "'=' padding before the end"
        )
        raise ImageInputError(
            f"The string is not valid base64 ({where}). Give standard base64 (A-Z, a-z, 0-9, +, /), "
            "a data:image/...;base64,... URL, or, for a local file, a pathlib.Path or file:// URL."
        )
    if len(compact.rstrip("=")) % 4 == 1:
        raise ImageInputError(
            f"The base64 string has an impossible length ({len(compact)} characters); it was probably cut short. "
            "Send the complete base64 text."
        )
    if max_bytes is not None:
        check_encoded_size(len(compact.rstrip("=")) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except binascii.Error as exc:  # unreachable after the checks above, kept as a backstop
        raise ImageInputError(
            f"The string is not valid base64 ({exc}). Send standard base64 text."
        ) from exc


def parse_data_url(url: str, max_bytes: int | None = None) -> bytes:
    """The payload bytes of a `data:[<mediatype>][;base64],<data>` URL.

    The media type is not trusted: the bytes are identified by their content.
    """
    header, comma, payload = url.partition(",")
    if not comma:
        raise ImageInputError(
            f"The data URL {preview(url)} has no ',' before its data. "
            "Use the form data:image/png;base64,<base64 data>."
        )
    if header[5:].lower().split(";")[-1].strip() == "base64":
        return decode_base64(payload, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if max_bytes is not None:
        check_encoded_size(len(data), max_bytes)
    return data


def _starts_like_base64_file(text: str) -> bool:
    """Whether `text`'s first characters are base64 of a known file signature."""
    head = "".join(text[:64].split())[:24]
    head = head[: len(head) // 4 * 4]
    try:
        return sniff(base64.b64decode(head, validate=True)) is not None
    except (binascii.Error, ValueError):
        return False


_EXTENSION_RE = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def _looks_like_path(text: str) -> bool:
    """A short single line with a file extension, a separator or a leading '~'.

    Base64 may hold '/' (a JPEG's starts with "/9j/"), so a string whose
    first characters decode to a known file signature counts as base64.
    """
    if len(text) > 4096 or any(c in text for c in "\n\r<>"):
        return False
    path_like = (
        bool(_EXTENSION_RE.search(text)) or "/" in text or "\\" in text or text.startswith("~")
    )
    return path_like and not _starts_like_base64_file(text)

# --------------------------------------------------------------------------
# The front door


_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass
class _Read:
    """One image read but not decoded: encoded bytes, or a caller's PIL image."""

    data: bytes | None = None
    pil: Image.Image | None = None
    quote: bool = True  # False for bytes from a file or a download: never shown in errors


def _read_string(text: str, policy: InputPolicy) -> _Read:
    s = text.strip()
    if not s:
        raise ImageInputError(f"The image string is empty. Give {ACCEPTED_KINDS}.")
    if s[:5].lower() == "data:":
        return _Read(parse_data_url(s, policy.max_image_bytes))
    scheme = _SCHEME_RE.match(s[:40])
    if scheme:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return _Read(fetch_image_bytes(s, policy), quote=False)
        if name == "file":
            return _Read(read_local_file(file_url_to_path(s), policy), quote=False)
        raise ImageInputError(
            f"The image URL {preview(s)} uses the scheme {name!r}; accepted are http(s) "
            "(with allow_image_urls), file:// (with allow_local_files) and data: URLs."
        )
    if _looks_like_path(s):
        return _Read(read_local_file(s, policy), quote=False)
    return _Read(decode_base64(s, policy.max_image_bytes))


def _read(value: object, policy: InputPolicy) -> _Read:
    """The encoded bytes (or PIL image) behind any accepted image value; nothing decoded yet."""
    if isinstance(value, Image.Image):
        return _Read(pil=value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        view = memoryview(value)
        check_encoded_size(view.nbytes, policy.max_image_bytes)
        return _Read(value if isinstance(value, bytes) else view.tobytes())
    if isinstance(value, str):
        return _read_string(value, policy)
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return _Read(read_local_file(path, policy), quote=False)
    raise ImageInputError(
        f"Cannot use a {type(value).__module__}.{type(value).__qualname__} as an image. "
        f"Give {ACCEPTED_KINDS}. Convert arrays with PIL.Image.fromarray."
    )


@dataclass
class _Pending:
    """One image checked and opened (headers only), waiting to be decoded."""

    opened: ImageFile.ImageFile | None  # from our own bytes
    pil: Image.Image | None  # the caller's, checked
    n_bytes: int

    @property
    def size(self) -> tuple[int, int]:
        image = self.opened if self.opened is not None else self.pil
        assert image is not None
        return image.size


def _prepare(read: _Read, policy: InputPolicy) -> _Pending:
    if read.pil is not None:
        check_pil(read.pil, policy)
        return _Pending(None, read.pil, 0)
    assert read.data is not None
    return _Pending(open_image_bytes(read.data, policy, quote=read.quote), None, len(read.data))


def _finish(pending: _Pending, policy: InputPolicy, max_side: int) -> Image.Image:
    """Decode one checked image, holding its estimated decoding memory from the process-wide budget
    (`images.budget`): concurrent requests wait for room rather than decode beyond it together."""
    checkpoint()  # a cancelled request decodes nothing more
    image = pending.opened if pending.opened is not None else pending.pil
    assert image is not None
    undecoded = pending.opened is not None or (isinstance(image, ImageFile.ImageFile) and bool(image.tile))
    with decode_memory_budget.hold(decode_memory_estimate(image) if undecoded else 0):
        if pending.pil is not None:
            return decode_pil(pending.pil, policy, max_side)
        assert pending.opened is not None
        return decode_opened(pending.opened, policy, max_side)


def load_image(
    value: object, policy: InputPolicy | None = None, *, max_side: int | None = None
) -> Image.Image:
    """Turn any accepted image value into a new, fully loaded RGB `PIL.Image.Image`.

    Accepted: a `PIL.Image.Image` (validated and converted, not re-encoded);
    encoded file bytes (`bytes`, `bytearray`, `memoryview`) in one of
    `ALLOWED_FORMATS`; a `str` holding a data URL, bare base64, an http(s)
    URL (only with `policy.allow_image_urls`) or a file:// URL or local path
    (only with `policy.allow_local_files`, confined to
    `policy.local_files_root`); a `pathlib.Path` (local file rules).

    A string with a file extension or a path separator is a path unless it
    starts as base64 of a known file; otherwise it is base64. To be explicit,
    pass paths as `pathlib.Path` and base64 as a data URL.

    The result's longer side is at most `max_side` (when given) and at most
    `policy.max_working_side`: larger images are downscaled as early as
    possible (JPEGs inside the decoder, others right after decoding, before
    any conversion copies their pixels), aspect ratio kept. Animated and
    multi-page images give their first frame (a PIL image gives the frame it
    is on). Transparency is composited onto white; 16-bit and float images
    are scaled to 8 bits; decoded files are turned upright by their EXIF
    orientation. `policy` defaults to `InputPolicy()`.

    Raises `ImageInputError` (a `ValueError`) for anything else, before any
    heavy work: wrong type, empty, corrupt or truncated data, non-image data,
    an unsupported format, zero size, too many pixels or bytes, a structure
    that would cost far more work than its size (`structure_problem`), and
    refused URLs or paths.
    """
    policy = policy or InputPolicy()
    side = working_side(policy, max_side)
    return _finish(_prepare(_read(value, policy), policy), policy, side)


def load_images(
    values: Sequence[object], policy: InputPolicy | None = None, *, max_side: int | None = None
) -> list[Image.Image]:
    """Load a request's images (as `load_image` does), with the request-wide limits checked first.

    Before any image is decoded: their number (`policy.max_images`), then,
    as each is read (base64 decoded, downloaded, read from disk) and its
    header opened, their total encoded bytes (`max_total_image_bytes`) and
    total declared pixels (`max_total_image_pixels`). Over a limit:
    `InputLimitError`. Then each is decoded and downscaled in turn, its
    encoded bytes released as it is done, so memory peaks at the encoded
    bytes plus one full-size decode.
    """
    policy = policy or InputPolicy()
    side = working_side(policy, max_side)
    check_request_totals(len(values), 0, 0, policy)
    pending: list[_Pending | None] = []
    n_bytes = pixels = 0
    for value in values:
        item = _prepare(_read(value, policy), policy)
        n_bytes += item.n_bytes
        pixels += item.size[0] * item.size[1]
        check_request_totals(len(values), n_bytes, pixels, policy)
        pending.append(item)
    images = []
    for i, item in enumerate(pending):
        assert item is not None
        pending[i] = None  # drop our reference to the encoded bytes once decoded
        images.append(_finish(item, policy, side))
    return images
