"""Structure walks: decode work bounded before Pillow parses anything (JPEG, PNG, GIF, TIFF, BMP)."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from PIL import Image

from ..errors import ImageInputError
from .checks import sniff

__all__ = [
    "MAX_BMP_RLE_BYTES",
    "MAX_GIF_BLOCKS",
    "MAX_JPEG_SCANS",
    "MAX_JPEG_SEGMENTS",
    "MAX_PNG_CHUNKS",
    "MAX_TIFF_BLOCKS",
    "MAX_TIFF_TAGS",
    "check_tiff_tiles",
    "jpeg_counts",
    "structure_problem",
]

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
    sig = sniff(data)
    check = _STRUCTURE_CHECKS.get(sig.name) if sig is not None and sig.kind == "accepted" else None
    return check(data) if check is not None else None


def check_tiff_tiles(im: Image.Image) -> None:
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
