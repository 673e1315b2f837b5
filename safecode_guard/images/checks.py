"""Limits and first looks: byte and pixel caps, request totals, what unknown bytes are."""

from __future__ import annotations

import struct
from typing import Literal, NamedTuple

from PIL import Image

from ..config import InputPolicy
from ..errors import ImageInputError, InputLimitError

__all__ = [
    "ACCEPTED_KINDS",
    "ACCEPTED_TEXT",
    "ALLOWED_FORMATS",
    "ALLOWED_PIL_FORMATS",
    "bomb_error",
    "check_encoded_size",
    "check_pixels",
    "check_request_totals",
    "describe_unreadable",
    "fit_within",
    "preview",
    "sniff",
]

#: Pillow format names we decode. Everything else (EPS, which runs
#: Ghostscript; PSD; ICO; the long tail of Pillow plugins) is refused, so an
#: attacker cannot pick which parser reads their bytes.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

ACCEPTED_TEXT = "PNG, JPEG, GIF, WEBP, BMP or TIFF"
ACCEPTED_KINDS = (
    "a PIL.Image.Image, encoded image bytes (bytes, bytearray, memoryview), "
    "a base64 string or data:image/...;base64,... URL, an http(s) URL "
    "(with InputPolicy(allow_image_urls=True)), or a local path, pathlib.Path or "
    "file:// URL (with InputPolicy(allow_local_files=True, local_files_root=...))"
)
# A JPEG loaded by Pillow may report "MPO" (multi-picture JPEG from cameras).
ALLOWED_PIL_FORMATS = frozenset((*ALLOWED_FORMATS, "MPO"))


def preview(value: str, limit: int = 60) -> str:
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


def check_request_totals(count: int, n_bytes: int, pixels: int, policy: InputPolicy) -> None:
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


def sniff(data: bytes) -> _Signature | None:
    """The first signature `data` starts with, or None."""
    for sig in _SIGNATURES:
        if data[sig.offset : sig.offset + len(sig.magic)] == sig.magic:
            return sig
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    return all(b >= 0x20 or b in b"\t\n\r\f" for b in sample) and 0x7F not in sample


def describe_unreadable(data: bytes, quote: bool = True) -> str:
    """Why Pillow (restricted to ALLOWED_FORMATS) could not identify `data`, with the fix.

    With `quote=False` (bytes read from a local file or a download) the
    message never shows any of the content, only what kind of data it is.
    """
    sig = sniff(data)
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
            f"{sig.name} images are not supported. Convert the image to {ACCEPTED_TEXT} "
            "(e.g. PNG) first."
        )
    if sig is not None:
        return f"The data is not an image: it looks like {sig.name}. Give the bytes of a {ACCEPTED_TEXT} file."
    if _looks_like_text(data):
        text = f" ({data[:40].decode('utf-8', errors='replace')!r})" if quote else ""
        hint = (
            " SVG (vector) images are not supported; rasterise to PNG first."
            if b"<svg" in data[:1024]
            else ""
        )
        return (
            f"The data is not an image: it looks like text{text}.{hint} Give the bytes of a "
            f"{ACCEPTED_TEXT} file; pass URLs and paths as str, not bytes."
        )
    first = f" (first bytes: {data[:8].hex(' ')})" if quote else ""
    return f"The data is not a recognised image{first}. Give the bytes of a {ACCEPTED_TEXT} file."


def bomb_error(exc: Exception, max_pixels: int) -> ImageInputError:
    # Pillow raises DecompressionBombError itself inside a few plugins (a GIF frame larger than
    # its screen, an MPO frame) before we see the size.
    return ImageInputError(
        f"The image claims too many pixels, a possible decompression bomb (Pillow: {exc}). "
        f"The limit is InputPolicy.max_image_pixels={max_pixels}, and Pillow's own "
        f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} also applies (this library never "
        "changes that global). Resize the image, or raise both limits if you trust the source."
    )
