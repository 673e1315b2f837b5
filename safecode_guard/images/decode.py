"""Decoding: header checks, decode memory, mode conversion, downscaling and EXIF orientation."""

from __future__ import annotations

import io
import math
import struct

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageFile

from ..config import InputPolicy
from ..errors import ImageInputError
from .checks import (
    ACCEPTED_TEXT,
    ALLOWED_FORMATS,
    ALLOWED_PIL_FORMATS,
    bomb_error,
    check_encoded_size,
    check_pixels,
    describe_unreadable,
    fit_within,
)
from .formats import check_tiff_tiles, structure_problem

__all__ = [
    "check_decode_memory",
    "check_pil",
    "decode_image_bytes",
    "decode_memory_estimate",
    "decode_opened",
    "decode_pil",
    "open_image_bytes",
    "to_rgb",
    "working_side",
]

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


# EXIF orientation, as `PIL.ImageOps.exif_transpose` reads and applies it (the same table; it
# reads malformed EXIF the same way too, tests/unit/test_images.py pins both). It is not used
# here because it transposes the image it reads the tag from: that is the full-size decode
# (the tag is gone from the small copy whenever conversion builds a new image: alpha
# compositing, 16-bit and float scaling), and transposing it would add a full-size copy to the
# decode memory `decode_memory_estimate` budgets. So the tag is read from the decode and the
# small copy is turned.
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
        raise bomb_error(exc, policy.max_image_pixels) from exc
    except Exception as exc:  # Pillow's parsers raise many types on bad input
        raise ImageInputError(describe_unreadable(data, quote)) from exc
    if im is None:
        raise ImageInputError(describe_unreadable(data, quote))
    check_pixels(im.size, policy.max_image_pixels)
    check_tiff_tiles(im)
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


def decode_opened(im: ImageFile.ImageFile, policy: InputPolicy, max_side: int | None) -> Image.Image:
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
        raise bomb_error(exc, policy.max_image_pixels) from exc
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
    return decode_opened(open_image_bytes(data, policy), policy, working_side(policy, max_side))


def working_side(policy: InputPolicy, max_side: int | None) -> int:
    """The longer side images are kept at: `max_side`, capped by `policy.max_working_side`."""
    if max_side is None:
        return policy.max_working_side
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"`max_side` (={max_side!r}) must be a positive number of pixels or None.")
    return min(max_side, policy.max_working_side)


def check_pil(im: Image.Image, policy: InputPolicy) -> None:
    """The checks a caller's PIL image gets before anything is loaded or copied."""
    check_pixels(im.size, policy.max_image_pixels)
    pending = isinstance(im, ImageFile.ImageFile) and bool(im.tile)
    if pending and im.format not in ALLOWED_PIL_FORMATS:
        # Loading a lazily opened EPS would run Ghostscript, for instance.
        raise ImageInputError(
            f"The PIL image is an undecoded {im.format} file; only {ACCEPTED_TEXT} are decoded here. "
            "Convert it yourself (e.g. im.convert('RGB')) if you trust the file."
        )
    if pending:
        check_tiff_tiles(im)
        check_decode_memory(im, policy)


def decode_pil(im: Image.Image, policy: InputPolicy, max_side: int | None) -> Image.Image:
    """A caller's PIL image, checked, loaded if lazily opened, shrunk and converted; `im` itself keeps its size.

    A lazily opened file is loaded in place (the caller opened it; loading is
    what Pillow would do on first use), at full size: to have a JPEG decoded
    small, and its scans counted, pass its bytes instead.
    """
    check_pil(im, policy)
    problem = "The PIL image cannot be loaded; its file is corrupt or truncated"
    _load_pixels(im, policy, problem, "Send the complete file, or re-export it.")
    try:
        return _shrink_to_rgb(im, max_side)
    except MemoryError as exc:
        raise _out_of_memory(im) from exc
