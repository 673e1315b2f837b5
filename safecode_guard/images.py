"""Every image a user gives us becomes a PIL RGB image here, safely.

Input flow (`load_image`):

- `PIL.Image.Image`: pixel cap checked from `.size`, pending pixel data
  loaded, mode converted (`to_rgb`). The caller's object is never modified.
- `bytes` / `bytearray` / `memoryview`: encoded file bytes -> `decode_image_bytes`.
- `str`: a `data:` URL, an `http(s)://` URL (only with
  `InputPolicy.allow_image_urls`), a `file://` URL or a local path (only with
  `InputPolicy.allow_local_files`), or bare base64.
- `pathlib.Path` / any `os.PathLike`: the local file rules.

`decode_image_bytes` is the one decoder: byte cap -> `Image.open` restricted
to `ALLOWED_FORMATS` (reads the header only) -> pixel cap from the header ->
`.load()` of the first frame -> EXIF orientation -> `to_rgb`.

Output: a new, fully loaded `PIL.Image.Image` of mode "RGB", or an
`ImageInputError` (a `ValueError`) whose message names the problem and the fix.
Every check that can refuse runs before any heavy decoding.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import re
import socket
import stat
import struct
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import httpx
import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps

from safecode_guard.config import InputPolicy
from safecode_guard.errors import ImageInputError

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_REDIRECTS",
    "address_problem",
    "check_encoded_size",
    "check_pixels",
    "decode_base64",
    "decode_image_bytes",
    "fetch_image_bytes",
    "load_image",
    "parse_data_url",
    "read_local_file",
    "to_rgb",
]

#: Pillow format names we decode. Everything else (EPS, which runs
#: Ghostscript; PSD; ICO; the long tail of Pillow plugins) is refused, so an
#: attacker cannot pick which parser reads their bytes.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")

#: Redirects one image download may follow; each hop's host is checked anew.
MAX_REDIRECTS = 3

_ACCEPTED = "PNG, JPEG, GIF, WEBP, BMP or TIFF"
_ACCEPTED_KINDS = (
    "a PIL.Image.Image, encoded image bytes (bytes, bytearray, memoryview), "
    "a base64 string or data:image/...;base64,... URL, an http(s) URL "
    "(with InputPolicy(allow_image_urls=True)), or a local path, pathlib.Path or "
    "file:// URL (with InputPolicy(allow_local_files=True))"
)
# A JPEG loaded by Pillow may report "MPO" (multi-picture JPEG from cameras).
_ALLOWED_PIL_FORMATS = frozenset((*ALLOWED_FORMATS, "MPO"))

# `warnings.catch_warnings` swaps process-wide state; the lock keeps our own
# threads from restoring each other's filters out of order.
_PIL_LOCK = threading.Lock()
_PIL_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)


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
    """Refuse a zero-size image and one over `max_pixels` (width * height).

    Called on the header's size, before any pixel is decoded, so a tiny file
    claiming 100000 x 100000 pixels (a decompression bomb) costs nothing.
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


def _describe_unreadable(data: bytes) -> str:
    """Why Pillow (restricted to ALLOWED_FORMATS) could not identify `data`, with the fix."""
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
        text = data[:40].decode("utf-8", errors="replace")
        hint = (
            " SVG (vector) images are not supported; rasterise to PNG first."
            if b"<svg" in data[:1024]
            else ""
        )
        return (
            f"The data is not an image: it looks like text ({text!r}).{hint} Give the bytes of a "
            f"{_ACCEPTED} file; pass URLs and paths as str, not bytes."
        )
    return (
        f"The data is not a recognised image (first bytes: {data[:8].hex(' ')}). "
        f"Give the bytes of a {_ACCEPTED} file."
    )


def _bomb_error(exc: Exception, max_pixels: int) -> ImageInputError:
    return ImageInputError(
        f"The image claims too many pixels, a possible decompression bomb (Pillow: {exc}). "
        f"The limit is InputPolicy.max_image_pixels={max_pixels}, and Pillow's own "
        f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} also applies (this library never "
        "changes that global). Resize the image, or raise both limits if you trust the source."
    )


# --------------------------------------------------------------------------
# Mode conversion


_WHITE = (255, 255, 255, 255)
_HIGH_DEPTH = frozenset(("I", "F", "I;16", "I;16B", "I;16L", "I;16N"))
_ALPHA_MODES = frozenset(("RGBA", "LA", "PA", "RGBa", "La"))


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-depth band to 0..255.

    `values`: `(H, W)` uint16 (modes "I;16*"), int32 ("I") or float32 ("F").
    Returns `(H, W)` uint8. 16-bit data is scaled by 255/65535 (65535 -> 255),
    never clipped. "I" and "F" carry no declared range, so we infer one (a
    shortcut, stated): "I" inside 0..255 is taken as 8-bit and inside
    0..65535 as 16-bit; "F" inside 0..1 is scaled by 255 and inside 0..255 kept;
    anything else is min-max stretched. NaN becomes 0.
    """
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
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
# Decoding


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (as browsers do), so the model sees the photo upright."""
    try:
        if im.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return im
        return ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not cost the user a valid image
        return im


def decode_image_bytes(data: bytes, policy: InputPolicy | None = None) -> Image.Image:
    """Decode encoded image file bytes into a new RGB image.

    Only `ALLOWED_FORMATS` are tried. The byte cap, then the header's pixel
    cap, are checked before any pixel is decoded; Pillow's own
    decompression-bomb error and warning become `ImageInputError` too.
    Animated or multi-page images (GIF, APNG, WEBP, TIFF) give their first
    frame only. A truncated or corrupt file is caught by loading the pixels
    eagerly here, not later inside a processor.
    """
    policy = policy or InputPolicy()
    check_encoded_size(len(data), policy.max_image_bytes)
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except _PIL_BOMB as exc:
            raise _bomb_error(exc, policy.max_image_pixels) from exc
        except Exception as exc:  # Pillow's parsers raise many types on bad input
            raise ImageInputError(_describe_unreadable(data)) from exc
        check_pixels(im.size, policy.max_image_pixels)
        try:
            im.load()
        except _PIL_BOMB as exc:
            raise _bomb_error(exc, policy.max_image_pixels) from exc
        except Exception as exc:  # truncated data, bad CRC, broken compressed stream, ...
            raise ImageInputError(
                f"The {im.format} image is corrupt or truncated ({type(exc).__name__}: {exc}). "
                "Send the complete, unmodified file, or re-export it."
            ) from exc
    # The header size can grow while loading (a GIF frame larger than its screen).
    check_pixels(im.size, policy.max_image_pixels)
    return to_rgb(_upright(im))


def _from_pil(im: Image.Image, policy: InputPolicy) -> Image.Image:
    check_pixels(im.size, policy.max_image_pixels)
    pending = isinstance(im, ImageFile.ImageFile) and bool(im.tile)
    if pending and im.format not in _ALLOWED_PIL_FORMATS:
        # Loading a lazily opened EPS would run Ghostscript, for instance.
        raise ImageInputError(
            f"The PIL image is an undecoded {im.format} file; only {_ACCEPTED} are decoded here. "
            "Convert it yourself (e.g. im.convert('RGB')) if you trust the file."
        )
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im.load()
        except _PIL_BOMB as exc:
            raise _bomb_error(exc, policy.max_image_pixels) from exc
        except Exception as exc:
            raise ImageInputError(
                f"The PIL image cannot be loaded; its file is corrupt or truncated ({type(exc).__name__}: {exc}). "
                "Send the complete file, or re-export it."
            ) from exc
    return to_rgb(im)


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
    written = Path(os.path.abspath(policy.local_files_root or os.getcwd()))
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


def _confine(path: Path, written_root: Path, real_root: Path) -> Path:
    """`path` resolved (symlinks followed), refused unless it lies in the root.

    The lexical check runs first so a missing file outside the root reads as
    "outside", never "not found" (no probing of what exists elsewhere).
    """
    candidate = path if path.is_absolute() else written_root / path
    lexical = Path(os.path.normpath(candidate))
    outside = ImageInputError(
        f"The image path {str(path)!r} lies outside the allowed folder {str(real_root)!r} "
        "(InputPolicy.local_files_root). Move the file into that folder or set local_files_root."
    )
    if not (lexical.is_relative_to(written_root) or lexical.is_relative_to(real_root)):
        raise outside
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError as exc:
        raise ImageInputError(
            f"The image file {str(path)!r} does not exist (looked in {str(real_root)!r}). Check the path."
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, permissions, NUL bytes
        raise ImageInputError(
            f"The image path {str(path)!r} cannot be resolved ({exc}). Check the path."
        ) from exc
    if not resolved.is_relative_to(real_root):
        raise ImageInputError(
            f"The image path {str(path)!r} leads outside the allowed folder {str(real_root)!r} "
            "through a symlink. Give a path to a regular file inside the folder."
        )
    return resolved


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    # O_NOFOLLOW: a symlink swapped in after resolving is refused; O_NONBLOCK:
    # opening a FIFO must not hang. fstat then checks the file actually opened.
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageInputError(
            f"Cannot open the image file {str(path)!r} ({exc.strerror}). Check its permissions."
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageInputError(
                f"{str(path)!r} is not a regular file. Give the path of an image file."
            )
        check_encoded_size(info.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    check_encoded_size(len(data), max_bytes)
    return data


def read_local_file(path: str | os.PathLike[str], policy: InputPolicy | None = None) -> bytes:
    """The bytes of a local image file, under `policy`'s local-file rules.

    Refused unless `policy.allow_local_files`. Relative paths are taken from
    `policy.local_files_root` (default: the current working directory); the
    resolved path (symlinks followed, '..' applied) must lie inside it.
    """
    policy = policy or InputPolicy()
    if not policy.allow_local_files:
        raise ImageInputError(
            f"Reading images from local files is off by default, so {_preview(os.fspath(path))} was not read "
            "(a string is taken as a path when it is not a data URL, an http(s) URL or base64 image data). "
            "Pass the image as bytes or a PIL image, or set InputPolicy(allow_local_files=True, "
            "local_files_root=...)."
        )
    written_root, real_root = _files_root(policy)
    resolved = _confine(Path(path), written_root, real_root)
    return _read_regular_file(resolved, policy.max_image_bytes)


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
        headers={"Host": parsed.netloc.decode("ascii"), "Accept": "image/*"},
        extensions={"sni_hostname": host} if parsed.scheme == "https" else {},
    )


def _check_deadline(deadline: float, url: str) -> None:
    # httpx's timeout bounds each read; a server trickling bytes needs a total bound too.
    if time.monotonic() > deadline:
        raise ImageInputError(
            f"The download from {_preview(url)} took longer than InputPolicy.url_timeout_s and was "
            "stopped. Try again, use a faster host, or raise url_timeout_s."
        )


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, url: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageInputError(
            f"The image at {_preview(url)} is {declared} bytes, over the limit of {max_bytes} "
            "(InputPolicy.max_image_bytes). Use a smaller image, or raise max_image_bytes."
        )
    chunks, total = [], 0
    # Decoded bytes are counted, so a gzip bomb stops at the cap too (one
    # decompressed chunk may overshoot it before we see it: a bounded shortcut).
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise ImageInputError(
                f"The download from {_preview(url)} passed the limit of {max_bytes} bytes "
                "(InputPolicy.max_image_bytes) and was stopped. Use a smaller image, or raise max_image_bytes."
            )
        _check_deadline(deadline, url)
        chunks.append(chunk)
    return b"".join(chunks)


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


def _load_string(text: str, policy: InputPolicy) -> Image.Image:
    s = text.strip()
    if not s:
        raise ImageInputError(f"The image string is empty. Give {_ACCEPTED_KINDS}.")
    if s[:5].lower() == "data:":
        return decode_image_bytes(parse_data_url(s, policy.max_image_bytes), policy)
    scheme = _SCHEME_RE.match(s[:40])
    if scheme:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return decode_image_bytes(fetch_image_bytes(s, policy), policy)
        if name == "file":
            return decode_image_bytes(read_local_file(_file_url_to_path(s), policy), policy)
        raise ImageInputError(
            f"The image URL {_preview(s)} uses the scheme {name!r}; accepted are http(s) "
            "(with allow_image_urls), file:// (with allow_local_files) and data: URLs."
        )
    if _looks_like_path(s):
        return decode_image_bytes(read_local_file(s, policy), policy)
    return decode_image_bytes(decode_base64(s, policy.max_image_bytes), policy)


def load_image(value: object, policy: InputPolicy | None = None) -> Image.Image:
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

    Animated and multi-page images give their first frame (a PIL image gives
    the frame it is on). Transparency is composited onto white; 16-bit and
    float images are scaled to 8 bits; decoded files are turned upright by
    their EXIF orientation. `policy` defaults to `InputPolicy()`.

    Raises `ImageInputError` (a `ValueError`) for anything else, before any
    heavy work: wrong type, empty, corrupt or truncated data, non-image data,
    an unsupported format, zero size, too many pixels or bytes, and refused
    URLs or paths.
    """
    policy = policy or InputPolicy()
    if isinstance(value, Image.Image):
        return _from_pil(value, policy)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = memoryview(value)
        check_encoded_size(data.nbytes, policy.max_image_bytes)
        return decode_image_bytes(data.tobytes() if not isinstance(value, bytes) else value, policy)
    if isinstance(value, str):
        return _load_string(value, policy)
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return decode_image_bytes(read_local_file(path, policy), policy)
    raise ImageInputError(
        f"Cannot use a {type(value).__module__}.{type(value).__qualname__} as an image. "
        f"Give {_ACCEPTED_KINDS}. Convert arrays with PIL.Image.fromarray."
    )
