"""Every image a user gives us becomes a PIL RGB image here, safely and within bounded memory and time.

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
import errno
import io
import ipaddress
import math
import os
import re
import socket
import stat
import struct
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import httpx
import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile

from safecode_guard.config import InputPolicy
from safecode_guard.control import checkpoint
from safecode_guard.decode_budget import decode_memory_budget
from safecode_guard.errors import ImageInputError, InputLimitError

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
    "load_image",
    "load_images",
    "open_image_bytes",
    "parse_data_url",
    "processor_sides",
    "read_local_file",
    "structure_problem",
    "to_rgb",
]

#: Pillow format names we decode. Everything else (EPS, which runs
#: Ghostscript; PSD; ICO; the long tail of Pillow plugins) is refused, so an
#: attacker cannot pick which parser reads their bytes.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

#: Redirects one image download may follow; each hop's host is checked anew.
MAX_REDIRECTS = 3

# Decode work, bounded before decoding. The pixel cap bounds memory, not work: these bound the
# steps a decoder takes per byte of a small file. Real files stay far below each.

#: Scans a JPEG's first image may hold. libjpeg makes one pass over every 8x8 block per scan
#: whatever the file size, so a flat progressive image whose last scan is repeated thousands of
#: times costs minutes in 100 kB. Encoders write 1 (baseline) to about 25 (progressive) scans.
MAX_JPEG_SCANS = 64
#: Marker segments (tables, metadata chunks, scans) a JPEG's first image may hold: each is a
#: Python step in Pillow's parser. Real files have tens (a large ICC profile or XMP adds a few hundred).
MAX_JPEG_SEGMENTS = 2000
#: Chunks a PNG may hold (Pillow reads each in Python). Encoders write IDAT chunks of 8 kB or more.
MAX_PNG_CHUNKS = 100_000
#: Extension and data sub-blocks before a GIF's first image (Pillow reads each in Python).
MAX_GIF_BLOCKS = 100_000
#: Entries in a TIFF's first directory (Pillow parses each in Python; real files have under 100).
MAX_TIFF_TAGS = 4096
#: Strips or tiles of a TIFF image (Pillow builds one Python tile per strip): one row per strip
#: up to 65536 rows passes.
MAX_TIFF_BLOCKS = 65_536
#: Largest run-length-encoded BMP: Pillow decodes BMP RLE in Python, about 2 bytes per step.
MAX_BMP_RLE_BYTES = 4_000_000

#: Factor between the largest side a processor resizes an image to and the working side we keep:
#: 2 so that the processor's own resize from the working size matches its resize from full size
#: (two antialiased downscales are close to one), times 2 so that shortest-edge and fixed-size
#: processors keep that margin on images up to 2:1 (beyond that the short side loses detail, a
#: stated shortcut).
WORKING_SIDE_MARGIN = 4

_ACCEPTED = "PNG, JPEG, GIF, WEBP, BMP or TIFF"
_ACCEPTED_KINDS = (
    "a PIL.Image.Image, encoded image bytes (bytes, bytearray, memoryview), "
    "a base64 string or data:image/...;base64,... URL, an http(s) URL "
    "(with InputPolicy(allow_image_urls=True)), or a local path, pathlib.Path or "
    "file:// URL (with InputPolicy(allow_local_files=True, local_files_root=...))"
)
# A JPEG loaded by Pillow may report "MPO" (multi-picture JPEG from cameras).
_ALLOWED_PIL_FORMATS = frozenset((*ALLOWED_FORMATS, "MPO"))


def _preview(value: str, limit: int = 60) -> str:
    """`value` shortened for an error message."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


# --------------------------------------------------------------------------
# Pure checks


def check_encoded_size(n_bytes: int, max_bytes: int) -> None:
    """Refuse empty data and data over `max_bytes` (`InputPolicy.max_image_bytes`)."""
    if n_bytes == 0:
        raise ImageInputError(
            "The image data is empty (0 bytes). Give the bytes of a PNG, JPEG, GIF, WEBP, BMP or TIFF file."
        )
    if n_bytes > max_bytes:
        raise ImageInputError(
            f"The image is {n_bytes} bytes, over the limit of {max_bytes} "
            "(InputPolicy.max_image_bytes). Re-encode or resize the image, "
            "or raise max_image_bytes if you trust the source."
        )


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse a zero-size image and one over `max_pixels` (width * height) or Pillow's own limit.

    Called on the header's size, before any pixel is decoded, so a tiny file
    claiming 100000 x 100000 pixels (a decompression bomb) costs nothing.
    Pillow's `PIL.Image.MAX_IMAGE_PIXELS` is enforced here too (as an error,
    where Pillow would only warn below twice that), so Pillow's own check
    never fires and no warning filter needs changing.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageInputError(
            f"The image has zero width or height ({width}x{height}). Give an image with at least one pixel."
        )
    if width * height > max_pixels:
        raise ImageInputError(
            f"The image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (InputPolicy.max_image_pixels), a guard against decompression bombs. "
            "Resize the image, or raise max_image_pixels if you trust the source."
        )
    pillow_limit = Image.MAX_IMAGE_PIXELS
    if pillow_limit is not None and width * height > pillow_limit:
        raise ImageInputError(
            f"The image is {width}x{height} = {width * height} pixels, a possible decompression bomb: "
            f"Pillow's own PIL.Image.MAX_IMAGE_PIXELS={pillow_limit} also applies (this library never "
            f"changes that global; InputPolicy.max_image_pixels={max_pixels}). Resize the image, or "
            "raise both limits if you trust the source."
        )


def fit_within(size: tuple[int, int], max_side: int | None) -> tuple[int, int] | None:
    """The size `size` is shrunk to so its longer side is at most `max_side` (aspect kept), or None if it fits.

    Each side stays at least 1 pixel.
    """
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, min(max_side, round(width * scale))), max(1, min(max_side, round(height * scale)))


def _check_request_totals(count: int, n_bytes: int, pixels: int, policy: InputPolicy) -> None:
    """Refuse a request whose images, together, are over the policy's request-wide caps."""
    if count > policy.max_images:
        raise InputLimitError(
            f"The request holds {count} images; the limit is {policy.max_images}. "
            "Send fewer images or raise `InputPolicy.max_images`."
        )
    if n_bytes > policy.max_total_image_bytes:
        raise InputLimitError(
            f"The request's images take {n_bytes} bytes (encoded) together, over the limit of "
            f"{policy.max_total_image_bytes} (InputPolicy.max_total_image_bytes); no image was decoded. "
            "Send fewer or smaller images, or raise max_total_image_bytes."
        )
    if pixels > policy.max_total_image_pixels:
        raise InputLimitError(
            f"The request's images hold {pixels} pixels together (from their headers), over the limit "
            f"of {policy.max_total_image_pixels} (InputPolicy.max_total_image_pixels); no image was "
            "decoded. Send fewer or smaller images, or raise max_total_image_pixels."
        )


_Kind = Literal["accepted", "unsupported", "not_image"]


class _Signature(NamedTuple):
    magic: bytes
    offset: int
    name: str
    kind: _Kind


# Used for classifying bare strings and for error messages only: the decoder
# itself is Pillow, restricted to ALLOWED_FORMATS.
_SIGNATURES: tuple[_Signature, ...] = (
    _Signature(b"\x89PNG\r\n\x1a\n", 0, "PNG", "accepted"),
    _Signature(b"\xff\xd8\xff", 0, "JPEG", "accepted"),
    _Signature(b"GIF87a", 0, "GIF", "accepted"),
    _Signature(b"GIF89a", 0, "GIF", "accepted"),
    _Signature(b"WEBP", 8, "WEBP", "accepted"),
    _Signature(b"BM", 0, "BMP", "accepted"),
    _Signature(b"II*\x00", 0, "TIFF", "accepted"),
    _Signature(b"MM\x00*", 0, "TIFF", "accepted"),
    _Signature(b"II+\x00", 0, "TIFF", "accepted"),
    _Signature(b"MM\x00+", 0, "TIFF", "accepted"),
    _Signature(b"%!PS", 0, "PostScript/EPS", "unsupported"),
    _Signature(b"\xc5\xd0\xd3\xc6", 0, "EPS", "unsupported"),
    _Signature(b"8BPS", 0, "Photoshop (PSD)", "unsupported"),
    _Signature(b"\x00\x00\x01\x00", 0, "ICO", "unsupported"),
    _Signature(b"icns", 0, "ICNS", "unsupported"),
    _Signature(b"ftypheic", 4, "HEIC", "unsupported"),
    _Signature(b"ftypheix", 4, "HEIC", "unsupported"),
    _Signature(b"ftypmif1", 4, "HEIF", "unsupported"),
    _Signature(b"ftypavif", 4, "AVIF", "unsupported"),
    _Signature(b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000", "unsupported"),
    _Signature(b"\xff\x4f\xff\x51", 0, "JPEG 2000", "unsupported"),
    _Signature(b"\x00\x00\x00\x0cJXL ", 0, "JPEG XL", "unsupported"),
    _Signature(b"\xff\x0a", 0, "JPEG XL", "unsupported"),
    _Signature(b"qoif", 0, "QOI", "unsupported"),
    _Signature(b"DDS ", 0, "DDS", "unsupported"),
    _Signature(b"gimp xcf", 0, "GIMP XCF", "unsupported"),
    _Signature(b"#?RADIANCE", 0, "Radiance HDR", "unsupported"),
    _Signature(b"v/1\x01", 0, "OpenEXR", "unsupported"),
    _Signature(b"%PDF", 0, "a PDF document", "not_image"),
    _Signature(b"PK\x03\x04", 0, "a ZIP archive (or Office document)", "not_image"),
    _Signature(b"\x1f\x8b", 0, "gzip-compressed data", "not_image"),
    _Signature(b"\x7fELF", 0, "an ELF executable", "not_image"),
    _Signature(b"WAVE", 8, "WAV audio", "not_image"),
    _Signature(b"AVI ", 8, "AVI video", "not_image"),
    _Signature(b"OggS", 0, "Ogg audio/video", "not_image"),
    _Signature(b"ID3", 0, "MP3 audio", "not_image"),
    _Signature(b"\x1a\x45\xdf\xa3", 0, "Matroska/WebM video", "not_image"),
    _Signature(b"ftyp", 4, "an MP4/QuickTime file", "not_image"),
)


def _sniff(data: bytes) -> _Signature | None:
    """The first signature `data` starts with, or None."""
    for sig in _SIGNATURES:
        if data[sig.offset : sig.offset + len(sig.magic)] == sig.magic:
            return sig
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    return all(b >= 0x20 or b in b"\t\n\r\f" for b in sample) and 0x7F not in sample


def _describe_unreadable(data: bytes, quote: bool = True) -> str:
    """Why Pillow (restricted to ALLOWED_FORMATS) could not identify `data`, with the fix.

    With `quote=False` (bytes read from a local file or a download) the
    message never shows any of the content, only what kind of data it is.
    """
    sig = _sniff(data)
    if sig is not None and sig.kind == "accepted":
        if sig.name == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            if width == 0 or height == 0:
                return f"The PNG image has zero width or height ({width}x{height}). Give an image with at least one pixel."
        return (
            f"The data starts like a {sig.name} image but its header is corrupt, truncated or "
            "declares a zero width or height. Re-export the image, or send the complete file."
        )
    if sig is not None and sig.kind == "unsupported":
        return (
            f"{sig.name} images are not supported. Convert the image to {_ACCEPTED} "
            "(e.g. PNG) first."
        )
    if sig is not None:
        return f"The data is not an image: it looks like {sig.name}. Give the bytes of a {_ACCEPTED} file."
    if _looks_like_text(data):
        text = f" ({data[:40].decode('utf-8', errors='replace')!r})" if quote else ""
        hint = (
            " SVG (vector) images are not supported; rasterise to PNG first."
            if b"<svg" in data[:1024]
            else ""
        )
        return (
            f"The data is not an image: it looks like text{text}.{hint} Give the bytes of a "
            f"{_ACCEPTED} file; pass URLs and paths as str, not bytes."
        )
    first = f" (first bytes: {data[:8].hex(' ')})" if quote else ""
    return f"The data is not a recognised image{first}. Give the bytes of a {_ACCEPTED} file."


def _bomb_error(exc: Exception, max_pixels: int) -> ImageInputError:
    # Pillow raises DecompressionBombError itself inside a few plugins (a GIF frame larger than
    # its screen, an MPO frame) before we see the size.
    return ImageInputError(
        f"The image claims too many pixels, a possible decompression bomb (Pillow: {exc}). "
        f"The limit is InputPolicy.max_image_pixels={max_pixels}, and Pillow's own "
        f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} also applies (this library never "
        "changes that global). Resize the image, or raise both limits if you trust the source."
    )


# --------------------------------------------------------------------------
# Structure walks: decode work bounded before Pillow parses anything
#
# Each walk follows the format's own framing (lengths, markers, sub-blocks) with
# a bounded number of Python steps and C-speed searches, and returns why the
# file would cost too much to parse or decode, or None. Truncated or malformed
# framing is left to Pillow, which reports it.


def _u16(data: bytes, pos: int, order: str = ">") -> int:
    return struct.unpack_from(order + "H", data, pos)[0]


# A marker is 0xFF followed by a byte other than 0x00 (a stuffed 0xFF in entropy-coded data)
# and 0xFF (fill). One byte of context only, so the search stays linear on runs of 0xFF.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xff])")
_JPEG_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RST0-7, SOI
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA


def jpeg_counts(data: bytes) -> tuple[int, int]:
    """`(scans, segments)` of a JPEG's first image, counted as libjpeg meets them.

    Like libjpeg: a segment's length skips its body, entropy-coded data and
    stray bytes are searched for the next marker, restart markers do not end
    a scan, and the first EOI ends the image (later MPO frames and trailing
    data are never decoded). Stops counting just past the limits.
    """
    scans = segments = 0
    pos = 2
    while scans <= MAX_JPEG_SCANS and segments <= MAX_JPEG_SEGMENTS:
        found = _JPEG_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_STANDALONE:
            continue
        segments += 1
        scans += marker == _JPEG_SOS
        if pos + 2 > len(data):
            break
        pos += max(2, _u16(data, pos))
    return scans, segments


def _jpeg_problem(data: bytes) -> str | None:
    scans, segments = jpeg_counts(data)
    if scans > MAX_JPEG_SCANS:
        return (
            f"The JPEG holds more than {MAX_JPEG_SCANS} scans; decoding costs one pass over the whole "
            "image per scan, so this file would take far longer than its size suggests (a scan bomb). "
            "Re-save it as a baseline JPEG or as PNG."
        )
    if segments > MAX_JPEG_SEGMENTS:
        return (
            f"The JPEG holds more than {MAX_JPEG_SEGMENTS} marker segments (tables, metadata, scans); "
            "real photos have tens. Re-save the image (e.g. as PNG) to drop its metadata."
        )
    return None


def _png_problem(data: bytes) -> str | None:
    pos, chunks = 8, 0
    while pos + 8 <= len(data):
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            return (
                f"The PNG holds more than {MAX_PNG_CHUNKS} chunks; encoders write a few dozen. "
                "Re-save the image."
            )
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def _gif_problem(data: bytes) -> str | None:
    """Counts the extension sub-blocks before the first image descriptor."""
    if len(data) < 13:
        return None
    flags = data[10]
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    blocks = 0
    while pos < len(data) and data[pos] == 0x21:  # an extension: label, then sub-blocks
        pos += 2
        while pos < len(data):
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                return (
                    f"The GIF holds more than {MAX_GIF_BLOCKS} extension blocks before its first image; "
                    "real files have a few. Re-save the image."
                )
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
    return None


_TIFF_BLOCK_TAGS = frozenset((273, 279, 324, 325))  # strip and tile offsets and byte counts
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
_TIFF_COMPRESSION = 259


def _tiff_problem(data: bytes) -> str | None:
    """Counts the first directory's entries and the values of its strip and tile arrays."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        if _u16(data, 2, order) == 43:  # BigTIFF: 8-byte offsets and counts
            ifd = struct.unpack_from(order + "Q", data, 8)[0]
            entries = struct.unpack_from(order + "Q", data, ifd)[0]
            first, step, fmt = ifd + 8, 20, order + "HHQ"
        else:
            ifd = struct.unpack_from(order + "I", data, 4)[0]
            entries = _u16(data, ifd, order)
            first, step, fmt = ifd + 2, 12, order + "HHI"
    except (struct.error, OverflowError):
        return None  # truncated, or an offset past any file: Pillow says so
    if entries > MAX_TIFF_TAGS:
        return (
            f"The TIFF's first directory holds {entries} entries, over {MAX_TIFF_TAGS}; real files have "
            "under 100. Re-save the image."
        )
    value_at = 12 if step == 20 else 8  # where an entry's inline value starts
    blocks = 0
    jpeg = False
    for i in range(entries):
        try:
            tag, _kind, count = struct.unpack_from(fmt, data, first + i * step)
            if tag == _TIFF_COMPRESSION:
                jpeg = _u16(data, first + i * step + value_at, order) in (6, 7)  # old- and new-style JPEG
        except struct.error:
            break
        if tag in _TIFF_BLOCK_TAGS and count > MAX_TIFF_BLOCKS:
            return (
                f"The TIFF is cut into {count} strips or tiles, over {MAX_TIFF_BLOCKS}; each costs a "
                "parsing step. Re-save it with more rows per strip (or as PNG)."
            )
        if tag in _TIFF_BLOCK_TAGS:
            blocks = max(blocks, count)
    # JPEG strips: one scan each when baseline; a progressive one repeats passes over the image
    # (the JPEG scan bomb). Entropy-coded data never holds FF DA, so counting it counts scans.
    if jpeg and data.count(b"\xff\xda") > blocks + MAX_JPEG_SCANS:
        return (
            f"The TIFF's JPEG data holds more than {MAX_JPEG_SCANS} scans beyond one per strip; decoding "
            "costs one pass over the image per scan. Re-save it as a baseline JPEG, PNG or uncompressed TIFF."
        )
    return None


def _bmp_problem(data: bytes) -> str | None:
    if len(data) < 34:
        return None
    header_size = struct.unpack_from("<I", data, 14)[0]
    compression = struct.unpack_from("<I", data, 30)[0] if header_size >= 40 else 0
    if compression in (1, 2) and len(data) > MAX_BMP_RLE_BYTES:  # RLE8, RLE4
        return (
            f"The run-length-encoded BMP is {len(data)} bytes, over {MAX_BMP_RLE_BYTES}; Pillow decodes "
            "BMP RLE in Python, a step per run. Re-save it as PNG."
        )
    return None


_STRUCTURE_CHECKS: dict[str, Callable[[bytes], str | None]] = {
    "JPEG": _jpeg_problem,
    "PNG": _png_problem,
    "GIF": _gif_problem,
    "TIFF": _tiff_problem,
    "BMP": _bmp_problem,
}


def structure_problem(data: bytes) -> str | None:
    """Why decoding `data` would cost far more work than its size suggests, or None.

    `data`: encoded image bytes. The format is sniffed from the signature; each
    check walks the format's framing with a bounded number of Python steps
    (see `MAX_JPEG_SCANS` and its siblings). WEBP needs none: libwebp parses
    and decodes in C, in time proportional to the pixels.
    """
    sig = _sniff(data)
    check = _STRUCTURE_CHECKS.get(sig.name) if sig is not None and sig.kind == "accepted" else None
    return check(data) if check is not None else None


def _check_tiff_tiles(im: Image.Image) -> None:
    """Refuse a TIFF whose declared tile dwarfs its image: libtiff allocates a whole tile at once."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return
    tile = tags.get(_TIFF_TILE_WIDTH), tags.get(_TIFF_TILE_LENGTH)
    if not all(isinstance(v, int) for v in tile):
        return
    width, height = im.size
    if tile[0] * tile[1] > max(4 * width * height, 1 << 20):
        raise ImageInputError(
            f"The TIFF declares {tile[0]}x{tile[1]} tiles for a {width}x{height} image; decoding "
            "would allocate a whole tile first (a memory bomb). Re-save it untiled or as PNG."
        )


# --------------------------------------------------------------------------
# Mode conversion


_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH = frozenset(("I", "F", "I;16", "I;16B", "I;16L", "I;16N"))
_ALPHA_MODES = frozenset(("RGBA", "LA", "PA", "RGBa", "La"))


def _scale_to_uint8(
    values: np.ndarray, mode: str, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Map a high-depth band to 0..255.

    `values`: `(H, W)` uint16 (modes "I;16*"), int32 ("I") or float32 ("F").
    Returns `(H, W)` uint8. 16-bit data is scaled by 255/65535 (65535 -> 255),
    never clipped. "I" and "F" carry no declared range, so we infer one (a
    shortcut, stated): "I" inside 0..255 is taken as 8-bit and inside
    0..65535 as 16-bit; "F" inside 0..1 is scaled by 255 and inside 0..255 kept;
    anything else is min-max stretched. NaN becomes 0. `value_range`: the
    finite `(min, max)` of the full-size image when `values` is a downscaled
    copy, so the inferred range is the original's (values are clipped to it:
    resampling may overshoot).
    """
    x = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if value_range is not None:
        lo, hi = value_range
        x = np.clip(x, lo, hi)
    else:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        x = x / 257.0
    elif mode == "I" and lo >= 0 and hi <= 255:
        pass
    elif mode == "I" and lo >= 0 and hi <= 65535:
        x = x / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        x = x * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        pass
    else:
        x = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _lab_to_rgb(im: Image.Image) -> Image.Image:
    # Pillow's plain convert() reinterprets LAB bands as RGB; a colour transform is needed.
    transform = ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
    )
    return ImageCms.applyTransform(im, transform)


def to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB image of `im`'s pixels; `im` itself is not modified.

    Transparency (alpha bands, and "transparency" in `im.info` for P, L and
    RGB images) is composited onto white, so a half-transparent red pixel
    becomes pink rather than red. High-depth modes ("I;16*", "I", "F") are
    scaled to 8 bits (see `_scale_to_uint8`). CMYK and YCbCr use Pillow's
    conversions (CMYK without an ICC profile, a shortcut); LAB goes through an
    sRGB colour transform.
    """
    try:
        if im.mode == "LAB":
            return _lab_to_rgb(im)
        if im.mode in _HIGH_DEPTH:
            # The 16-bit "transparency" colour (rare) is dropped here: a shortcut.
            im = Image.fromarray(_scale_to_uint8(np.asarray(im), im.mode))
        if im.mode in ("La", "RGBa"):  # premultiplied: undo it first
            im = im.convert("LA" if im.mode == "La" else "RGBA")
        if im.mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return im.convert("RGB")
    except (ValueError, OSError, ImageCms.PyCMSError) as exc:
        raise ImageInputError(
            f"Cannot convert an image of mode {im.mode!r} to RGB ({exc}). "
            "Convert it to RGB yourself, or re-save it as PNG or JPEG."
        ) from exc


# --------------------------------------------------------------------------
# Downscaling to the working size


_ROWS_PER_BAND = 256


def _finite_range(im: Image.Image) -> tuple[float, float]:
    """`(min, max)` of a high-depth image with NaN and infinities counted as 0, as `_scale_to_uint8` does.

    Read in bands of rows, so no full-size float copy is made.
    """
    if im.mode != "F":
        lo, hi = im.getextrema()
        return float(lo), float(hi)
    lo, hi = math.inf, -math.inf
    for top in range(0, im.height, _ROWS_PER_BAND):
        band = np.asarray(im.crop((0, top, im.width, min(im.height, top + _ROWS_PER_BAND))))
        band = np.nan_to_num(band, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _shrink_to_rgb(im: Image.Image, max_side: int | None) -> Image.Image:
    """`im` (fully loaded, any mode) as a new RGB image whose longer side is at most `max_side`.

    The full-size image is resized before any conversion copies its pixels:
    only palette, bilevel and colour-keyed images are first expanded (to 1-4
    bytes per pixel, as they must be for resampling to mean anything), and
    high-depth images keep their full-size value range for the 8-bit mapping.
    Resampling is bicubic after an integer box reduction (`reducing_gap`),
    like Hugging Face processors' own resize (box averaging for high-depth
    images).
    """
    target = fit_within(im.size, max_side)
    if target is None:
        return to_rgb(im)
    resample = Image.Resampling.BICUBIC
    if im.mode in _HIGH_DEPTH:
        # Box averaging: Pillow resamples "I;16" with no other filter, and it never overshoots.
        work = im.convert("I") if im.mode in ("I;16B", "I;16L", "I;16N") else im  # not resampled
        value_range = _finite_range(work)
        small = np.asarray(work.resize(target, Image.Resampling.BOX))
        return Image.fromarray(_scale_to_uint8(small, im.mode, value_range)).convert("RGB")
    if im.mode in ("P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    elif im.mode == "1":
        im = im.convert("L")
    return to_rgb(im.resize(target, resample, reducing_gap=3.0))


_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of `im`, 1 when absent or malformed."""
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # malformed EXIF must not cost the user a valid image
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _upright(im: Image.Image, orientation: int) -> Image.Image:
    """Apply the EXIF orientation (as browsers do), so the model sees the photo upright."""
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


# --------------------------------------------------------------------------
# Decoding


def _open_allowed(data: bytes) -> ImageFile.ImageFile | None:
    """Pillow's plugin for the first of `ALLOWED_FORMATS` that accepts `data` (headers read, no pixels).

    What `Image.open(..., formats=ALLOWED_FORMATS)` does, minus its
    decompression-bomb check: that check can only warn for sizes between
    Pillow's limit and twice it, and catching its warning needs a change of
    process-wide warning filters (and a lock around every decode). We check
    the size ourselves right after (`check_pixels`, Pillow's limit included).
    """
    Image.init()
    prefix = data[:16]
    for name in ALLOWED_FORMATS:
        if name not in Image.OPEN:  # e.g. Pillow built without WEBP support
            continue
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(prefix)
        if accepted and not isinstance(accepted, str):
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format after all, as Image.open treats it
    return None


def open_image_bytes(
    data: bytes, policy: InputPolicy | None = None, *, quote: bool = True
) -> ImageFile.ImageFile:
    """Check encoded image bytes and open their header, without decoding any pixel.

    Every check that can refuse before decoding runs here: the byte cap, the
    format's framing (`structure_problem`), the format allow-list, the pixel
    caps from the header, TIFF tile sizes. Returns the lazily opened Pillow
    image (its `size` is the declared one). `quote=False` keeps the bytes'
    content out of error messages (local files, downloads).
    """
    policy = policy or InputPolicy()
    check_encoded_size(len(data), policy.max_image_bytes)
    problem = structure_problem(data)
    if problem:
        raise ImageInputError(problem)
    try:
        im = _open_allowed(data)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, policy.max_image_pixels) from exc
    except Exception as exc:  # Pillow's parsers raise many types on bad input
        raise ImageInputError(_describe_unreadable(data, quote)) from exc
    if im is None:
        raise ImageInputError(_describe_unreadable(data, quote))
    check_pixels(im.size, policy.max_image_pixels)
    _check_tiff_tiles(im)
    check_decode_memory(im, policy)
    return im


# Peak bytes per header pixel while Pillow decodes an image and we shrink it: measured on
# 40 M-pixel images (2026-11-30, Pillow 12, VmHWM), plus about 10%. The decoder's buffers
# and the full-size copies that conversion and resampling need: alpha is premultiplied in a
# copy, palettes are expanded, WEBP passes its frame through two buffers, and libjpeg keeps
# every coefficient of a progressive file.
_BYTES_PER_PIXEL_WEBP = 19  # measured 17.8
_BYTES_PER_PIXEL_PALETTE_ALPHA = 12  # 10.8
_BYTES_PER_PIXEL_ALPHA = 11  # 9.8
_BYTES_PER_PIXEL_DEEP_COLOUR = 11  # TIFFs of more than 8 bits per colour sample: 10.1
_BYTES_PER_PIXEL_PROGRESSIVE_CMYK = 10  # 9.1
_BYTES_PER_PIXEL_PROGRESSIVE = 8  # 4:4:4, 7.1
_BYTES_PER_PIXEL_PALETTE = 8  # 6.8
_BYTES_PER_PIXEL_OTHER = 7  # RGB 5.8, float grey 6.2, 16-bit grey 3.8
_BYTES_PER_PIXEL_GREY = 2  # 1.6


def decode_memory_estimate(im: Image.Image) -> int:
    """Bytes that decoding `im` (opened, not loaded) and shrinking it may take at the peak, from its
    header: format, mode, size, JPEG progression. Compared with `InputPolicy.max_decode_mb`."""
    pixels = im.width * im.height
    mode, fmt = im.mode, im.format
    alpha = mode in ("LA", "La", "RGBA", "RGBa", "PA") or "transparency" in im.info
    if fmt == "WEBP":
        per_pixel = _BYTES_PER_PIXEL_WEBP
    elif fmt in ("JPEG", "MPO") and im.info.get("progressive"):
        per_pixel = _BYTES_PER_PIXEL_PROGRESSIVE_CMYK if mode == "CMYK" else _BYTES_PER_PIXEL_PROGRESSIVE
    elif mode in ("P", "PA"):
        per_pixel = _BYTES_PER_PIXEL_PALETTE_ALPHA if alpha else _BYTES_PER_PIXEL_PALETTE
    elif alpha:
        per_pixel = _BYTES_PER_PIXEL_ALPHA
    elif fmt == "TIFF" and (_deep_colour_tiff(im) or im.info.get("compression") in ("jpeg", "tiff_jpeg")):
        # libtiff's JPEG path holds a progressive file's coefficients, as libjpeg does
        per_pixel = _BYTES_PER_PIXEL_DEEP_COLOUR
    elif mode in ("1", "L"):
        per_pixel = _BYTES_PER_PIXEL_GREY
    else:
        per_pixel = _BYTES_PER_PIXEL_OTHER
    return pixels * per_pixel


def _deep_colour_tiff(im: Image.Image) -> bool:
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # BitsPerSample
    bits = bits if isinstance(bits, tuple) else (bits,) if isinstance(bits, int) else ()
    return len(bits) >= 3 and max(bits) > 8


def check_decode_memory(im: Image.Image, policy: InputPolicy) -> None:
    """`ImageInputError` when decoding `im` would take more than `policy.max_decode_mb`."""
    need = decode_memory_estimate(im)
    if need > policy.max_decode_mb * 2**20:
        raise ImageInputError(
            f"Decoding this {im.width}x{im.height} {im.format or ''} {im.mode} image would take about "
            f"{need / 2**20:.0f} MB, over the limit of {policy.max_decode_mb} MB (InputPolicy.max_decode_mb). "
            "Send it smaller (or as PNG or JPEG, which decode in less memory), or raise max_decode_mb "
            "if this process may spend that much on one image."
        )


def _decode_opened(im: ImageFile.ImageFile, policy: InputPolicy, max_side: int | None) -> Image.Image:
    """Decode an image from `open_image_bytes` (first frame), small: JPEGs inside libjpeg, others right after."""
    target = fit_within(im.size, max_side)
    if target is not None and im.format in ("JPEG", "MPO"):
        im.draft(None, target)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, still at least `target`
    problem = f"The {im.format} image is corrupt or truncated"
    _load_pixels(im, policy, problem, "Send the complete, unmodified file, or re-export it.")
    # The header size can grow while loading (a GIF frame larger than its screen).
    check_pixels(im.size, policy.max_image_pixels)
    orientation = _orientation(im)  # after loading: a PNG's eXIf chunk may follow its pixels
    try:
        return _upright(_shrink_to_rgb(im, max_side), orientation)
    except MemoryError as exc:
        raise _out_of_memory(im) from exc


def _load_pixels(im: Image.Image, policy: InputPolicy, problem: str, fix: str) -> None:
    """`im.load()` with every failure typed: a bomb, memory, or a corrupt file (`problem`, `fix`)."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, policy.max_image_pixels) from exc
    except MemoryError as exc:
        raise _out_of_memory(im) from exc
    except Exception as exc:  # truncated data, bad CRC, broken compressed stream, ...
        raise ImageInputError(f"{problem} ({type(exc).__name__}: {exc}). {fix}") from exc


def _out_of_memory(im: Image.Image) -> ImageInputError:
    return ImageInputError(
        f"Ran out of memory decoding a {im.width}x{im.height} {im.format or im.mode} image. Send a "
        "smaller image, or lower InputPolicy.max_image_pixels / max_working_side so requests fit in memory."
    )


def decode_image_bytes(
    data: bytes, policy: InputPolicy | None = None, *, max_side: int | None = None
) -> Image.Image:
    """Decode encoded image file bytes into a new RGB image, at most `max_side` on its longer side.

    Only `ALLOWED_FORMATS` are tried; every check of `open_image_bytes` runs
    before any pixel is decoded. Animated or multi-page images (GIF, APNG,
    WEBP, TIFF) give their first frame only. A truncated or corrupt file is
    caught by loading the pixels eagerly here, not later inside a processor.
    `max_side` is capped by `policy.max_working_side`.
    """
    policy = policy or InputPolicy()
    return _decode_opened(open_image_bytes(data, policy), policy, _working_side(policy, max_side))


def _working_side(policy: InputPolicy, max_side: int | None) -> int:
    """The longer side images are kept at: `max_side`, capped by `policy.max_working_side`."""
    if max_side is None:
        return policy.max_working_side
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"`max_side` (={max_side!r}) must be a positive number of pixels or None.")
    return min(max_side, policy.max_working_side)


def _check_pil(im: Image.Image, policy: InputPolicy) -> None:
    """The checks a caller's PIL image gets before anything is loaded or copied."""
    check_pixels(im.size, policy.max_image_pixels)
    pending = isinstance(im, ImageFile.ImageFile) and bool(im.tile)
    if pending and im.format not in _ALLOWED_PIL_FORMATS:
        # Loading a lazily opened EPS would run Ghostscript, for instance.
        raise ImageInputError(
            f"The PIL image is an undecoded {im.format} file; only {_ACCEPTED} are decoded here. "
            "Convert it yourself (e.g. im.convert('RGB')) if you trust the file."
        )
    if pending:
        _check_tiff_tiles(im)
        check_decode_memory(im, policy)


def _from_pil(im: Image.Image, policy: InputPolicy, max_side: int | None) -> Image.Image:
    """A caller's PIL image, checked, loaded if lazily opened, shrunk and converted; `im` itself keeps its size.

    A lazily opened file is loaded in place (the caller opened it; loading is
    what Pillow would do on first use), at full size: to have a JPEG decoded
    small, and its scans counted, pass its bytes instead.
    """
    _check_pil(im, policy)
    problem = "The PIL image cannot be loaded; its file is corrupt or truncated"
    _load_pixels(im, policy, problem, "Send the complete file, or re-export it.")
    try:
        return _shrink_to_rgb(im, max_side)
    except MemoryError as exc:
        raise _out_of_memory(im) from exc


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
            f"The data URL {_preview(url)} has no ',' before its data. "
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
        return _sniff(base64.b64decode(head, validate=True)) is not None
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
# Local files


def _files_root(policy: InputPolicy) -> tuple[Path, Path]:
    """The allowed folder as written (absolute) and with symlinks resolved."""
    if policy.local_files_root is None:  # InputPolicy refuses this; a model_construct()ed one may not
        raise ImageInputError(
            "Local image files need InputPolicy.local_files_root, the folder paths must lie in. "
            "Set it, e.g. InputPolicy(allow_local_files=True, local_files_root=\"/srv/images\")."
        )
    written = Path(os.path.abspath(policy.local_files_root))
    try:
        real = written.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ImageInputError(
            f"InputPolicy.local_files_root ({str(written)!r}) does not exist. Set it to an existing folder."
        ) from exc
    if not real.is_dir():
        raise ImageInputError(
            f"InputPolicy.local_files_root ({str(written)!r}) is not a folder. Set it to a folder."
        )
    return written, real


_MAX_SYMLINKS = 40  # as Linux's own limit
_O_COMMON = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_O_FOLDER = _O_COMMON | getattr(os, "O_DIRECTORY", 0)
# O_NONBLOCK: opening a FIFO must not hang; O_NOCTTY: a terminal must not become ours.
_O_FILE = _O_COMMON | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def _below(path: Path, roots: tuple[Path, Path]) -> list[str] | None:
    """The components of absolute `path` below one of `roots`, or None when it is not under them."""
    for root in roots:
        if path.is_relative_to(root):
            return list(path.relative_to(root).parts)
    return None


def _outside(shown: str, root: Path, via_link: bool) -> ImageInputError:
    if via_link:
        return ImageInputError(
            f"The image path {shown!r} leads outside the allowed folder {str(root)!r} "
            "through a symlink. Give a path to a regular file inside the folder."
        )
    return ImageInputError(
        f"The image path {shown!r} lies outside the allowed folder {str(root)!r} "
        "(InputPolicy.local_files_root). Move the file into that folder or set local_files_root."
    )


def _readlink(name: str, folder_fd: int) -> str | None:
    """The target of the symlink `name` in `folder_fd`, or None if it is not a symlink (now)."""
    try:
        return os.readlink(name, dir_fd=folder_fd)
    except (OSError, ValueError):
        return None


def _open_error(shown: str, root: Path, exc: OSError) -> ImageInputError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ImageInputError(
            f"The image file {shown!r} does not exist (looked in {str(root)!r}). Check the path."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ImageInputError(
            f"Cannot open the image file {shown!r} ({exc.strerror}). Check its permissions."
        )
    return ImageInputError(f"The image path {shown!r} cannot be resolved ({exc.strerror}). Check the path.")


def _open_beneath(root_fd: int, parts: Sequence[str], shown: str, roots: tuple[Path, Path]) -> int:
    """A descriptor for the entry at `parts` beneath the open folder `root_fd`, never leaving it.

    Each component is opened relative to its parent's descriptor with
    `O_NOFOLLOW`, so a folder swapped for a symlink between two steps is seen
    rather than followed. A symlink met on the way is read and its target
    walked the same way: kept inside the root (an absolute target must name
    the root's path) it is followed, at most `_MAX_SYMLINKS` times; '..' never
    climbs above the root. Shortcut, stated: a folder already opened that is
    then moved out of the root by someone who can write outside it is still
    read from.
    """
    real_root = roots[1]
    folders: list[int] = []  # descriptors walked into, below the root
    pending = [p for p in reversed(parts) if p not in ("", ".")]
    links = 0
    try:
        while pending:
            name = pending.pop()
            here = folders[-1] if folders else root_fd
            if name == "..":
                if not folders:
                    raise _outside(shown, real_root, via_link=links > 0)
                os.close(folders.pop())
                continue
            try:
                fd = os.open(name, _O_FOLDER if pending else _O_FILE, dir_fd=here)
            except OSError as exc:
                target = _readlink(name, here)
                if target is None:
                    raise _open_error(shown, real_root, exc) from exc
                links += 1
                if links > _MAX_SYMLINKS:
                    raise ImageInputError(
                        f"The image path {shown!r} cannot be resolved (more than {_MAX_SYMLINKS} symlinks, "
                        "probably a loop). Check the path."
                    ) from exc
                steps = Path(target).parts
                if os.path.isabs(target):
                    below = _below(Path(target), roots)
                    if below is None:
                        raise _outside(shown, real_root, via_link=True) from exc
                    while folders:
                        os.close(folders.pop())
                    steps = tuple(below)
                pending.extend(p for p in reversed(steps) if p not in ("", "."))
                continue
            if not pending:
                return fd
            folders.append(fd)
        # The path names a folder (e.g. "sub/.."): its descriptor, for the caller to refuse.
        return os.dup(folders[-1] if folders else root_fd)
    finally:
        for fd in folders:
            os.close(fd)


def _read_fd(fd: int, shown: str, max_bytes: int) -> bytes:
    """At most `max_bytes` from `fd`, a regular file (checked on the descriptor itself)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ImageInputError(f"{shown!r} is not a regular file. Give the path of an image file.")
    check_encoded_size(info.st_size, max_bytes)
    with os.fdopen(fd, "rb", closefd=False) as f:
        data = f.read(max_bytes + 1)  # the file may have grown since fstat
    check_encoded_size(len(data), max_bytes)
    return data


def read_local_file(path: str | os.PathLike[str], policy: InputPolicy | None = None) -> bytes:
    """The bytes of a local image file, under `policy`'s local-file rules.

    Refused unless `policy.allow_local_files`. Relative paths are taken from
    `policy.local_files_root` (required); absolute ones must lie in it. The
    file is opened one component at a time beneath the root folder's
    descriptor (`O_NOFOLLOW` on each), so swapping a folder for a symlink
    while we open cannot lead outside; symlinks that stay inside are followed.
    """
    policy = policy or InputPolicy()
    shown = os.fspath(path)
    if not policy.allow_local_files:
        raise ImageInputError(
            f"Reading images from local files is off by default, so {_preview(shown)} was not read "
            "(a string is taken as a path when it is not a data URL, an http(s) URL or base64 image data). "
            "Pass the image as bytes or a PIL image, or set InputPolicy(allow_local_files=True, "
            "local_files_root=...)."
        )
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise ImageInputError(
            "Reading local image files needs openat() and O_NOFOLLOW (Linux, macOS, BSD), which this "
            "platform lacks. Pass the image as bytes instead."
        )
    if "\x00" in shown:
        raise ImageInputError(f"The image path {shown!r} cannot be resolved (it holds a NUL byte). Check the path.")
    written_root, real_root = _files_root(policy)
    roots = (real_root, written_root)
    candidate = Path(shown) if os.path.isabs(shown) else written_root / shown
    # Lexical check first, so a missing file outside the root reads as "outside",
    # never "not found" (no probing of what exists elsewhere).
    lexical = Path(os.path.normpath(candidate))
    if _below(lexical, roots) is None:
        raise _outside(shown, real_root, via_link=False)
    # Walked as written ('..' included, physically); a path that only reaches the root through
    # '..' outside it is walked in its lexical form. Either way the walk cannot leave the root.
    parts = _below(candidate, roots) or _below(lexical, roots) or []
    root_fd = os.open(real_root, _O_FOLDER)
    try:
        fd = _open_beneath(root_fd, parts, shown, roots)
    finally:
        os.close(root_fd)
    try:
        return _read_fd(fd, shown, policy.max_image_bytes)
    finally:
        os.close(fd)


def _file_url_to_path(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise ImageInputError(
            f"The file URL {_preview(url)} names a remote host ({parsed.netloc!r}). "
            "Use file:///absolute/path for a local file."
        )
    return urllib.request.url2pathname(parsed.path)


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
            f"The image URL {_preview(url)} is malformed ({exc}). Check the URL."
        ) from exc
    if parsed.scheme not in ("http", "https"):
        raise ImageInputError(
            f"The image URL {_preview(url)} uses the scheme {parsed.scheme!r}; only http and https "
            "are fetched. Download the image yourself and pass its bytes."
        )
    host = parsed.host
    if not host:
        raise ImageInputError(f"The image URL {_preview(url)} has no host. Check the URL.")
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
                f"Refusing to fetch {_preview(url)}: its host {host!r} resolves to {address}, a {problem} "
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
            f"The download from {_preview(url)} took longer than InputPolicy.url_timeout_s and was "
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
            f"The server sent the image at {_preview(url)} with Content-Encoding {header!r}; only gzip, "
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
                f"The download from {_preview(url)} passed the limit of {max_bytes} bytes "
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
            f"The image at {_preview(url)} is {declared[:20]} bytes, over the limit of {max_bytes} "
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
            f"The compressed image data from {_preview(url)} is corrupt ({exc}). "
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
            f"Fetching image URLs is off by default, so {_preview(url)} was not fetched (a guardrail "
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
                    f"Cannot fetch the image at {_preview(url)} ({type(exc).__name__}: {exc}). "
                    "Check the URL, or download the image yourself and pass its bytes."
                ) from exc
            try:
                location = response.headers.get("location")
                if response.is_redirect and location:  # a relative Location keeps the host
                    url = str(httpx.URL(url).join(location))
                    continue
                if not response.is_success:
                    raise ImageInputError(
                        f"The server at {_preview(url)} answered HTTP {response.status_code}. Check the URL."
                    )
                return _read_capped(response, policy.max_image_bytes, deadline, url)
            except httpx.HTTPError as exc:
                raise ImageInputError(
                    f"The download from {_preview(url)} failed ({type(exc).__name__}: {exc}). "
                    "Try again, or download the image yourself and pass its bytes."
                ) from exc
            finally:
                response.close()
    raise ImageInputError(
        f"The image URL redirected more than {MAX_REDIRECTS} times (last: {_preview(url)}). Use the final image URL."
    )


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
        raise ImageInputError(f"The image string is empty. Give {_ACCEPTED_KINDS}.")
    if s[:5].lower() == "data:":
        return _Read(parse_data_url(s, policy.max_image_bytes))
    scheme = _SCHEME_RE.match(s[:40])
    if scheme:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return _Read(fetch_image_bytes(s, policy), quote=False)
        if name == "file":
            return _Read(read_local_file(_file_url_to_path(s), policy), quote=False)
        raise ImageInputError(
            f"The image URL {_preview(s)} uses the scheme {name!r}; accepted are http(s) "
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
        f"Give {_ACCEPTED_KINDS}. Convert arrays with PIL.Image.fromarray."
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
        _check_pil(read.pil, policy)
        return _Pending(None, read.pil, 0)
    assert read.data is not None
    return _Pending(open_image_bytes(read.data, policy, quote=read.quote), None, len(read.data))


def _finish(pending: _Pending, policy: InputPolicy, max_side: int) -> Image.Image:
    """Decode one checked image, holding its estimated decoding memory from the process-wide budget
    (`decode_budget`): concurrent requests wait for room rather than decode beyond it together."""
    checkpoint()  # a cancelled request decodes nothing more
    image = pending.opened if pending.opened is not None else pending.pil
    assert image is not None
    undecoded = pending.opened is not None or (isinstance(image, ImageFile.ImageFile) and bool(image.tile))
    with decode_memory_budget.hold(decode_memory_estimate(image) if undecoded else 0):
        if pending.pil is not None:
            return _from_pil(pending.pil, policy, max_side)
        assert pending.opened is not None
        return _decode_opened(pending.opened, policy, max_side)


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
    side = _working_side(policy, max_side)
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
    side = _working_side(policy, max_side)
    _check_request_totals(len(values), 0, 0, policy)
    pending: list[_Pending | None] = []
    n_bytes = pixels = 0
    for value in values:
        item = _prepare(_read(value, policy), policy)
        n_bytes += item.n_bytes
        pixels += item.size[0] * item.size[1]
        _check_request_totals(len(values), n_bytes, pixels, policy)
        pending.append(item)
    images = []
    for i, item in enumerate(pending):
        assert item is not None
        pending[i] = None  # drop our reference to the encoded bytes once decoded
        images.append(_finish(item, policy, side))
    return images


# --------------------------------------------------------------------------
# Working size from a Hugging Face processor

# Keys of `size`-like settings that give a side in pixels, and those that give an area.
_SIDE_KEYS = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
_AREA_KEYS = ("max_pixels",)
# Settings that multiply a tile's side (a 1 x N grid of tiles is N tiles long).
_TILE_COUNT_ATTRS = ("max_image_tiles", "max_patches", "max_num_tiles", "max_num_patches_per_image")


def _as_mapping(value: object) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    fields = getattr(value, "__dataclass_fields__", None)  # transformers' SizeDict
    if fields is not None:
        return {name: getattr(value, name, None) for name in fields}
    return None


def _numbers(value: object) -> list[float]:
    """Every positive number in `value` (a number, or nested lists of them)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if value > 0 else []
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return []


def _sides(setting: object, edges_are_areas: bool) -> list[float]:
    """Side lengths (pixels) a `size` / `crop_size` / `max_image_size`-like setting can resize to."""
    mapping = _as_mapping(setting)
    if mapping is None:
        return _numbers(setting)  # an int side or a (height, width) pair
    sides = []
    for key in _SIDE_KEYS:
        for n in _numbers(mapping.get(key)):
            is_area = edges_are_areas and key.endswith("_edge")
            sides.append(math.sqrt(n) if is_area else n)
    sides += [math.sqrt(n) for key in _AREA_KEYS for n in _numbers(mapping.get(key))]
    return sides


def processor_sides(image_processor: object) -> list[float]:
    """Every side length (pixels) `image_processor` may resize an image to, read from its settings.

    Generic, no per-family code: `size`, `crop_size`, `max_image_size`,
    `image_grid_pinpoints` (sides); `max_pixels` (an area: its square root);
    Qwen-VL style processors (those with a `merge_size`) give `size`'s
    `shortest_edge` / `longest_edge` as pixel counts; a tile count
    (`max_image_tiles`, `max_patches`, ...) multiplies the tile side.
    """
    edges_are_areas = getattr(image_processor, "merge_size", None) is not None
    sides: list[float] = []
    for name in ("size", "crop_size", "max_image_size", "pad_size"):
        sides += _sides(getattr(image_processor, name, None), edges_are_areas and name == "size")
    sides += _numbers(getattr(image_processor, "image_grid_pinpoints", None))
    sides += [math.sqrt(n) for n in _numbers(getattr(image_processor, "max_pixels", None))]
    tile = max(_sides(getattr(image_processor, "size", None), edges_are_areas), default=0.0)
    for name in _TILE_COUNT_ATTRS:
        sides += [tile * n for n in _numbers(getattr(image_processor, name, None))]
    return sides


def image_working_side(processor: object, policy: InputPolicy | None = None) -> int:
    """The longest side (pixels) worth keeping of an image for `processor`, capped by `policy.max_working_side`.

    `processor`: a Hugging Face processor (its `image_processor` is read) or
    an image processor. The largest side it can resize to
    (`processor_sides`) times `WORKING_SIDE_MARGIN`, so that the processor's
    own resize from the working size matches its resize from full size
    closely. A processor whose sizes cannot be read gets the policy's cap.
    """
    policy = policy or InputPolicy()
    image_processor = getattr(processor, "image_processor", None) or processor
    sides = processor_sides(image_processor)
    if not sides:
        return policy.max_working_side
    return max(1, min(policy.max_working_side, math.ceil(WORKING_SIDE_MARGIN * max(sides))))
