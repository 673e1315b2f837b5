"""Image input safety: every accepted kind becomes RGB; every bad input a clear ImageInputError.

Offline: pytest-socket is active; URL fetches run through `httpx.MockTransport`
and a fake resolver.
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps
from pydantic import ValidationError
from support.image_bytes import encode, png_chunk

from safecode_guard.config import InputPolicy
from safecode_guard.errors import ImageInputError
from safecode_guard.images import (
    ALLOWED_FORMATS,
    MAX_REDIRECTS,
    address_problem,
    check_pixels,
    decode_base64,
    decode_image_bytes,
    fetch_image_bytes,
    load_image,
    parse_data_url,
    read_local_file,
    to_rgb,
)

# --------------------------------------------------------------------------
# Helpers

# These checks take milliseconds; the failure they guard against (decoding a bomb, waiting on a
# FIFO or a trickling server) takes minutes. The bound is loose so a busy CI machine never flakes.
HANG_BOUND_S = 5.0


def noise_image(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    # Noise does not compress, so truncating the file really loses pixel data.
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims `width` x `height` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def rgb_at(im: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 2) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


RED_PNG = encode(Image.new("RGB", (4, 3), (255, 0, 0)), "PNG")


def raises_image_error(value: object, policy: InputPolicy | None = None) -> str:
    with pytest.raises(ImageInputError) as info:
        load_image(value, policy)
    return str(info.value)


# --------------------------------------------------------------------------
# Good inputs


def test_error_is_a_value_error() -> None:
    assert issubclass(ImageInputError, ValueError)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_inputs_decode(wrap: type) -> None:
    im = load_image(wrap(RED_PNG))
    assert im.mode == "RGB" and im.size == (4, 3)
    assert rgb_at(im, (3, 2)) == (255, 0, 0)


def test_base64_forms_decode() -> None:
    b64 = base64.b64encode(RED_PNG).decode()
    mime = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    for value in (
        b64,
        f"  {b64}\n",
        mime,
        b64.rstrip("="),  # padding dropped by some encoders
        f"data:image/png;base64,{b64}",
        f"DATA:image/png;BASE64,{mime}",
        f"data:;base64,{b64}",
    ):
        assert rgb_at(load_image(value)) == (255, 0, 0), value[:40]


def test_jpeg_base64_starting_with_slash_is_not_taken_for_a_path() -> None:
    b64 = base64.b64encode(encode(Image.new("RGB", (8, 8), (0, 0, 255)), "JPEG")).decode()
    assert b64.startswith("/9j/")
    assert close_to(rgb_at(load_image(b64)), (0, 0, 255), tol=4)


def test_percent_encoded_data_url_decodes() -> None:
    url = "data:image/png," + "".join(f"%{b:02x}" for b in RED_PNG)
    assert rgb_at(load_image(url)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_every_allowed_format_decodes(fmt: str) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(Image.new("RGB", (5, 7), (10, 200, 30)), fmt, **kwargs)
    im = load_image(data)
    assert im.size == (5, 7)
    assert close_to(rgb_at(im, (2, 3)), (10, 200, 30), tol=4 if fmt == "JPEG" else 0)


def _mode_image(mode: str, value: object, **info: object) -> Image.Image:
    im = Image.new(mode, (2, 2), value)
    if mode in ("P", "PA"):
        im.putpalette([255, 0, 0] + [0, 255, 0] + [0, 0, 0] * 254)
    im.info.update(info)
    return im


@pytest.mark.parametrize(
    ("im", "expected"),
    [
        (_mode_image("RGB", (1, 2, 3)), (1, 2, 3)),
        # half-transparent red over white is pink: alpha is composited, not dropped
        (_mode_image("RGBA", (255, 0, 0, 128)), (255, 127, 127)),
        (_mode_image("RGBA", (255, 0, 0, 0)), (255, 255, 255)),
        (_mode_image("RGBa", (128, 0, 0, 128)), (255, 127, 127)),
        (_mode_image("LA", (0, 128)), (127, 127, 127)),
        (_mode_image("La", (0, 128)), (127, 127, 127)),
        (_mode_image("PA", (0, 128)), (255, 127, 127)),
        (_mode_image("P", 0, transparency=0), (255, 255, 255)),
        (_mode_image("P", 1, transparency=0), (0, 255, 0)),
        (_mode_image("L", 200), (200, 200, 200)),
        (_mode_image("L", 50, transparency=50), (255, 255, 255)),
        (_mode_image("RGB", (9, 9, 9), transparency=(9, 9, 9)), (255, 255, 255)),
        (_mode_image("1", 1), (255, 255, 255)),
        (_mode_image("1", 0), (0, 0, 0)),
        (_mode_image("I;16", 65535), (255, 255, 255)),
        (_mode_image("I;16", 32768), (128, 128, 128)),
        (_mode_image("I;16B", 65535), (255, 255, 255)),
        (_mode_image("I", 200), (200, 200, 200)),  # 8-bit range kept
        (_mode_image("I", 65535), (255, 255, 255)),  # 16-bit range scaled
        (_mode_image("F", 0.5), (128, 128, 128)),  # 0..1 floats scaled
        (_mode_image("F", 200.0), (200, 200, 200)),
        (_mode_image("CMYK", (0, 0, 0, 0)), (255, 255, 255)),
        (_mode_image("CMYK", (255, 0, 0, 0)), (0, 255, 255)),
        (_mode_image("YCbCr", (76, 85, 255)), (254, 0, 0)),
        (_mode_image("LAB", (255, 128, 128)), (255, 255, 255)),
        (_mode_image("HSV", (0, 255, 255)), (255, 0, 0)),
    ],
    ids=lambda v: v.mode if isinstance(v, Image.Image) else None,
)
def test_to_rgb_modes(im: Image.Image, expected: tuple[int, int, int]) -> None:
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == im.size
    assert close_to(rgb_at(out), expected), (im.mode, rgb_at(out))


def test_sixteen_bit_ramp_scales_without_clipping() -> None:
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = load_image(encode(Image.fromarray(ramp), "PNG"))
    assert [rgb_at(out, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_wide_int_and_float_ranges_are_stretched() -> None:
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert [rgb_at(to_rgb(wide), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    nan = Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32))
    assert [rgb_at(to_rgb(nan), (x, 0))[0] for x in range(2)] == [0, 255]


@pytest.mark.parametrize(
    ("mode", "value", "fmt", "expected"),
    [
        ("RGBA", (255, 0, 0, 128), "PNG", (255, 127, 127)),
        ("RGBA", (255, 0, 0, 128), "WEBP", (255, 127, 127)),
        ("LA", (0, 128), "PNG", (127, 127, 127)),
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "BMP", (255, 255, 255)),
        ("I;16", 65535, "PNG", (255, 255, 255)),
        ("I;16", 65535, "TIFF", (255, 255, 255)),
        ("I", 65535, "TIFF", (255, 255, 255)),
        ("F", 0.5, "TIFF", (128, 128, 128)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("CMYK", (0, 0, 0, 0), "JPEG", (255, 255, 255)),
    ],
)
def test_decoded_files_in_odd_modes(
    mode: str, value: object, fmt: str, expected: tuple[int, int, int]
) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = load_image(encode(Image.new(mode, (3, 3), value), fmt, **kwargs))
    assert close_to(rgb_at(out, (1, 1)), expected, tol=3), rgb_at(out, (1, 1))


def test_palette_png_with_transparency_is_white_where_transparent() -> None:
    im = Image.new("P", (2, 1), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    im.putpixel((1, 0), 1)
    out = load_image(encode(im, "PNG", transparency=0))
    assert rgb_at(out, (0, 0)) == (255, 255, 255)
    assert rgb_at(out, (1, 0)) == (0, 0, 255)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert rgb_at(load_image(data)) == (255, 0, 0)


def test_animated_webp_gives_first_frame() -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in ((0, 255, 0), (255, 0, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert rgb_at(load_image(data)) == (0, 255, 0)


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (4, 2), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    out = load_image(encode(im, "JPEG", exif=exif))
    assert out.size == (2, 4)


def _exif_segment(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """Raw EXIF bytes (little-endian TIFF, one directory) holding `(tag, type, count, value)` entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def test_exif_orientation_turns_the_image_as_pillow_exif_transpose_does() -> None:
    """Every orientation 1-8 gives the pixels `ImageOps.exif_transpose` gives (a lossless PNG, no downscale)."""
    im = Image.new("RGB", (3, 2))
    im.putdata([(10, 0, 0), (20, 0, 0), (30, 0, 0), (0, 40, 0), (0, 50, 0), (0, 60, 0)])
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(im, "PNG", exif=exif)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        out = load_image(data)
        assert (out.size, list(out.getdata())) == (expected.size, list(expected.getdata())), orientation


def test_malformed_exif_orientation_leaves_the_image_as_stored() -> None:
    """An orientation that cannot be read costs the user nothing: the image comes as stored (as with
    `ImageOps.exif_transpose`), never an error. A readable orientation beside a broken tag still applies."""
    short = struct.pack("<HH", 6, 0)
    cases = {
        "out of range": (_exif_segment([(0x0112, 3, 1, struct.pack("<HH", 9, 0))]), (4, 2)),
        "text, not a number": (_exif_segment([(0x0112, 2, 2, b"6\x00\x00\x00")]), (4, 2)),
        "value past the end": (_exif_segment([(0x0112, 5, 1, struct.pack("<I", 9999))]), (4, 2)),
        "truncated": (_exif_segment([(0x0112, 3, 1, short)])[:16], (4, 2)),
        "not TIFF at all": (b"Exif\x00\x00" + b"\xff" * 20, (4, 2)),
        "a broken neighbour": (_exif_segment([(0x0112, 3, 1, short), (0x8769, 4, 1, struct.pack("<I", 99999))]), (2, 4)),
    }
    for name, (segment, size) in cases.items():
        data = encode(Image.new("RGB", (4, 2), (0, 0, 255)), "JPEG", exif=segment)
        assert load_image(data).size == size == ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size, name


def test_pil_inputs_are_converted_but_never_modified() -> None:
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 128))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (255, 0, 0, 128)
    assert rgb_at(out) == (255, 127, 127)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    copy = load_image(rgb)
    assert copy is not rgb and rgb_at(copy) == (1, 2, 3)


def test_lazily_opened_pil_image_is_loaded() -> None:
    lazy = Image.open(io.BytesIO(RED_PNG))
    assert lazy.tile  # nothing decoded yet
    assert rgb_at(load_image(lazy)) == (255, 0, 0)


# --------------------------------------------------------------------------
# Bad inputs: type, empty, not an image, bad base64


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (42, "builtins.int"),
        (None, "builtins.NoneType"),
        ({"url": "x"}, "builtins.dict"),
        ([RED_PNG], "builtins.list"),
        (np.zeros((2, 2, 3), dtype=np.uint8), "numpy.ndarray"),
    ],
)
def test_unsupported_types_name_the_type_and_the_accepted_kinds(
    value: object, type_name: str
) -> None:
    msg = raises_image_error(value)
    assert type_name in msg
    assert "PIL.Image.Image" in msg and "base64" in msg and "allow_local_files" in msg


@pytest.mark.parametrize("value", [b"", bytearray(), "", "   \n", "data:image/png;base64,"])
def test_empty_inputs(value: object) -> None:
    assert "empty" in raises_image_error(value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"hello world, not an image", "looks like text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF document"),
        (b"PK\x03\x04\x14\x00\x00\x00", "ZIP archive"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (bytes(range(256)) * 4, "not a recognised image (first bytes: 00 01 02"),
        (b"\x00", "not a recognised image"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "WAV audio"),
    ],
)
def test_non_image_data(data: bytes, expected: str) -> None:
    msg = raises_image_error(data)
    assert expected in msg
    assert "PNG, JPEG, GIF, WEBP, BMP or TIFF" in msg or "rasterise" in msg


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "PostScript/EPS"),
        (b"8BPS\x00\x01" + b"\x00" * 40, "Photoshop (PSD)"),
        (encode(Image.new("RGB", (16, 16)), "ICO"), "ICO"),
        (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, "AVIF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 20, "HEIC"),
        (b"qoif\x00\x00\x00\x01", "QOI"),
    ],
)
def test_unsupported_image_formats(data: bytes, name: str) -> None:
    msg = raises_image_error(data)
    assert msg.startswith(f"{name} images are not supported")
    assert "Convert the image" in msg


def test_unlisted_pillow_formats_are_not_decoded() -> None:
    # Pillow can read PPM, but it is not on our allow-list.
    ppm = encode(Image.new("RGB", (3, 3)), "PPM")
    assert Image.open(io.BytesIO(ppm)).format == "PPM"
    assert "not a recognised image" in raises_image_error(ppm)


def test_undecoded_pil_image_of_a_refused_format_is_not_loaded() -> None:
    # Loading a lazily opened EPS would start Ghostscript.
    eps = Image.open(io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"))
    assert eps.format == "EPS" and eps.tile
    assert "undecoded EPS" in raises_image_error(eps)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("!!!!not base64!!!!", "not valid base64 ('!' at position 0)"),
        ("iVBORw0KGgo=AAAA", "not valid base64 ('=' padding before the end)"),
        ("iVBORw0KG", "impossible length"),
        ("data:image/png;base64,iVBOR$w0KGgo", "not valid base64 ('$' at position 5)"),
        ("data:image/png;base64", "no ','"),
    ],
)
def test_invalid_base64(value: str, expected: str) -> None:
    assert expected in raises_image_error(value)


def test_base64_of_non_image_says_so() -> None:
    value = base64.b64encode(b"just some words, definitely no pixels").decode()
    assert "looks like text" in raises_image_error(value)


def test_data_url_media_type_is_not_trusted() -> None:
    value = "data:image/png;base64," + base64.b64encode(b"%PDF-1.4 fake").decode()
    assert "PDF document" in raises_image_error(value)


# --------------------------------------------------------------------------
# Bad inputs: corrupt, truncated, zero size


def test_truncated_png_is_caught_at_load_time() -> None:
    data = encode(noise_image(), "PNG")
    # Pillow's lazy open accepts the header; only loading reveals the cut.
    assert Image.open(io.BytesIO(data[: len(data) // 2])).size == (64, 64)
    msg = raises_image_error(data[: len(data) // 2])
    assert msg.startswith("The PNG image is corrupt or truncated")
    assert "complete" in msg


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_files(fmt: str) -> None:
    data = encode(noise_image(), fmt)
    msg = raises_image_error(data[: len(data) * 2 // 3])
    # WEBP is decoded whole at open, so its cut shows up as a header problem.
    assert ("corrupt or truncated" if fmt != "WEBP" else "corrupt, truncated") in msg


def test_truncated_header() -> None:
    assert "starts like a PNG image but its header is corrupt" in raises_image_error(RED_PNG[:20])
    assert "starts like a GIF image" in raises_image_error(b"GIF89a\x01")


def test_corrupt_png_data_is_caught() -> None:
    data = bytearray(encode(noise_image(), "PNG"))
    idat = data.index(b"IDAT")
    for i in range(idat + 40, idat + 60):
        data[i] ^= 0xFF
    assert "corrupt or truncated" in raises_image_error(bytes(data))


def test_truncated_lazy_pil_image() -> None:
    data = encode(noise_image(), "PNG")
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))
    assert "corrupt or truncated" in raises_image_error(lazy)


def test_zero_size_images() -> None:
    assert "zero width or height (0x0)" in raises_image_error(Image.new("RGB", (0, 0)))
    assert "zero width or height (0x5)" in raises_image_error(png_claiming(0, 5))
    assert "zero width or height" in raises_image_error(Image.new("L", (7, 0)))


# --------------------------------------------------------------------------
# Size limits and decompression bombs


def test_bomb_header_is_rejected_fast_without_touching_pillow_globals() -> None:
    before_max, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    data = png_claiming(100_000, 100_000)
    assert len(data) < 100
    start = time.perf_counter()
    msg = raises_image_error(data)
    assert time.perf_counter() - start < HANG_BOUND_S
    assert "decompression bomb" in msg and "max_image_pixels" in msg
    assert before_max == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == before_filters


def test_pixel_cap_from_header_below_pillows_own_limit() -> None:
    msg = raises_image_error(png_claiming(7000, 7000))  # 49M > 40M default, < Pillow's warning
    assert msg.startswith("The image is 7000x7000 = 49000000 pixels, over the limit of 40000000")
    assert "InputPolicy.max_image_pixels" in msg


def test_policy_pixel_cap_is_configurable() -> None:
    small = InputPolicy(max_image_pixels=100)
    assert "over the limit of 100" in raises_image_error(
        encode(Image.new("RGB", (11, 10)), "PNG"), small
    )
    assert "over the limit of 100" in raises_image_error(Image.new("RGB", (11, 10)), small)
    assert load_image(encode(Image.new("RGB", (10, 10)), "PNG"), small).size == (10, 10)


def test_pillows_bomb_warning_becomes_our_error() -> None:
    # The policy allows 10**10 pixels, so Pillow's own limit is what refuses.
    lenient = InputPolicy(max_image_pixels=10**10)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        warn_range = raises_image_error(png_claiming(10_000, 10_000), lenient)  # > MAX, < 2 * MAX
        error_range = raises_image_error(png_claiming(100_000, 100_000), lenient)
    assert [w.message for w in leaked] == []  # converted, not printed
    for msg in (warn_range, error_range):
        assert "decompression bomb" in msg and "PIL.Image.MAX_IMAGE_PIXELS" in msg


def test_gif_screen_bomb() -> None:
    data = bytearray(encode(Image.new("L", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 60_000, 60_000)
    start = time.perf_counter()
    assert "pixels" in raises_image_error(bytes(data))
    assert time.perf_counter() - start < HANG_BOUND_S


def test_byte_cap() -> None:
    policy = InputPolicy(max_image_bytes=len(RED_PNG) - 1)
    msg = raises_image_error(RED_PNG, policy)
    assert f"{len(RED_PNG)} bytes, over the limit of {len(RED_PNG) - 1}" in msg
    assert "max_image_bytes" in msg
    assert "over the limit" in raises_image_error(memoryview(RED_PNG), policy)


def test_huge_base64_is_refused_from_its_length_before_decoding() -> None:
    policy = InputPolicy(max_image_bytes=1_000_000)
    huge = "iVBORw0KGgo" + "A" * 40_000_001
    start = time.perf_counter()
    assert "over the limit of 1000000" in raises_image_error(huge, policy)
    assert time.perf_counter() - start < HANG_BOUND_S


def test_check_pixels_pure() -> None:
    check_pixels((10, 10), 100)
    with pytest.raises(ImageInputError, match="over the limit of 99"):
        check_pixels((10, 10), 99)
    with pytest.raises(ImageInputError, match="zero width"):
        check_pixels((0, 10), 99)


def test_decode_base64_and_parse_data_url_pure() -> None:
    assert decode_base64("aGk") == b"hi"
    assert decode_base64(" aG\nk= ") == b"hi"
    assert parse_data_url("data:text/plain,h%69") == b"hi"
    with pytest.raises(ImageInputError, match="over the limit of 1"):
        decode_base64("aGk=", max_bytes=1)


# --------------------------------------------------------------------------
# URLs and local files are off by default


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any name lookup or HTTP client creation record itself and fail."""
    calls: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(repr(args))
        raise AssertionError("network touched")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(httpx, "Client", refuse)
    return calls


@pytest.mark.parametrize(
    "url", ["http://example.com/cat.png", "https://93.184.215.14/cat.png", "HTTPS://x.org/a.jpg"]
)
def test_urls_are_refused_by_default_without_touching_the_network(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_network(monkeypatch)
    msg = raises_image_error(url)  # an ImageInputError, not pytest-socket's error
    assert msg.startswith("Fetching image URLs is off by default")
    assert "allow_image_urls=True" in msg
    assert calls == []


def test_fetch_function_itself_refuses_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _no_network(monkeypatch)
    with pytest.raises(ImageInputError, match="off by default"):
        fetch_image_bytes("https://example.com/cat.png")
    assert calls == []


@pytest.mark.parametrize(
    "value",
    [
        "cat.png",
        "./images/cat.jpg",
        "/etc/passwd",
        "~/secret.png",
        "file:///etc/passwd",
        Path("cat.png"),
    ],
)
def test_local_paths_are_refused_by_default(value: object) -> None:
    msg = raises_image_error(value)
    assert msg.startswith("Reading images from local files is off by default")
    assert "allow_local_files=True" in msg


@pytest.mark.parametrize("url", ["ftp://example.com/cat.png", "gopher://x/y", "javascript://x"])
def test_other_url_schemes(url: str) -> None:
    assert "uses the scheme" in raises_image_error(url)


# --------------------------------------------------------------------------
# Local files when allowed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "sub").mkdir(parents=True)
    (folder / "red.png").write_bytes(RED_PNG)
    (folder / "sub" / "red.png").write_bytes(RED_PNG)
    (tmp_path / "outside.png").write_bytes(RED_PNG)
    return folder


def files_policy(root: Path, **kwargs: object) -> InputPolicy:
    return InputPolicy(allow_local_files=True, local_files_root=str(root), **kwargs)


def test_local_files_inside_root(root: Path) -> None:
    policy = files_policy(root)
    for value in (
        "red.png",
        "sub/red.png",
        "sub/../red.png",
        str(root / "red.png"),
        root / "sub" / "red.png",
        (root / "red.png").as_uri(),
    ):
        assert rgb_at(load_image(value, policy)) == (255, 0, 0), value


def test_local_files_need_an_explicit_root(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Changed on purpose: the working directory used to be the default root, so with
    # cwd "/" any file was readable. A root is now required, and a relative one is pinned at once.
    with pytest.raises(ValidationError, match="needs `local_files_root`"):
        InputPolicy(allow_local_files=True)
    monkeypatch.chdir(root / "sub")
    policy = InputPolicy(allow_local_files=True, local_files_root=".")
    assert policy.local_files_root == str(root / "sub")
    monkeypatch.chdir("/")
    assert rgb_at(load_image("red.png", policy)) == (255, 0, 0)
    assert "outside the allowed folder" in raises_image_error("../red.png", policy)


@pytest.mark.parametrize(
    "value", ["../outside.png", "sub/../../outside.png", "../missing.png", "/etc/hostname"]
)
def test_local_paths_outside_root_are_refused(root: Path, value: str) -> None:
    msg = raises_image_error(value, files_policy(root))
    # Missing files outside the root read as "outside" too: no probing of what exists.
    assert "lies outside the allowed folder" in msg and "local_files_root" in msg


def test_absolute_path_outside_root(root: Path) -> None:
    msg = raises_image_error(root.parent / "outside.png", files_policy(root))
    assert "lies outside the allowed folder" in msg


def test_symlink_escape_is_refused(root: Path) -> None:
    (root / "link.png").symlink_to(root.parent / "outside.png")
    (root / "linkdir").symlink_to(root.parent)
    policy = files_policy(root)
    assert "through a symlink" in raises_image_error("link.png", policy)
    assert "through a symlink" in raises_image_error("linkdir/outside.png", policy)


def test_symlink_inside_root_is_fine(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "sub" / "red.png")
    assert rgb_at(load_image("alias.png", files_policy(root))) == (255, 0, 0)


def test_root_given_through_a_symlink(root: Path) -> None:
    alias = root.parent / "alias_root"
    alias.symlink_to(root)
    assert rgb_at(load_image(str(alias / "red.png"), files_policy(alias))) == (255, 0, 0)


def test_local_file_problems(root: Path) -> None:
    policy = files_policy(root)
    assert "does not exist" in raises_image_error("nope.png", policy)
    assert "not a regular file" in raises_image_error("sub/", policy)
    (root / "notes.txt").write_text("hello there")
    assert "looks like text" in raises_image_error("notes.txt", policy)
    (root / "empty.png").write_bytes(b"")
    assert "empty" in raises_image_error("empty.png", policy)
    assert "remote host" in raises_image_error("file://server/share/red.png", policy)
    assert "cannot be resolved" in raises_image_error("bad\x00name.png", policy)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_hanging(root: Path) -> None:
    os.mkfifo(root / "pipe.png")
    start = time.perf_counter()
    assert "not a regular file" in raises_image_error("pipe.png", files_policy(root))
    assert time.perf_counter() - start < HANG_BOUND_S


def test_local_file_over_byte_cap(root: Path) -> None:
    policy = files_policy(root, max_image_bytes=10)
    assert "over the limit of 10" in raises_image_error("red.png", policy)


def test_missing_root(tmp_path: Path) -> None:
    policy = files_policy(tmp_path / "gone")
    assert "local_files_root" in raises_image_error("red.png", policy)


def test_read_local_file_pure_entry(root: Path) -> None:
    assert read_local_file("red.png", files_policy(root)) == RED_PNG
    with pytest.raises(ImageInputError, match="off by default"):
        read_local_file(root / "red.png")


# --------------------------------------------------------------------------
# Address checks


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoint
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-global"),  # carrier-grade NAT
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fe80::1%eth0", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside ::ffff:7f00:1)"),
        ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1"),
        ("2002:7f00:1::", "loopback (IPv4 127.0.0.1"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254"),  # NAT64
    ],
)
def test_address_problem_refuses_non_public(address: str, problem: str) -> None:
    result = address_problem(address)
    assert result is not None and result.startswith(problem)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.215.14", "1.1.1.1", "2606:4700:4700::1111", "2001:4860:4860::8888"],
)
def test_address_problem_accepts_public(address: str) -> None:
    assert address_problem(address) is None


def test_address_problem_needs_an_ip() -> None:
    with pytest.raises(ValueError):
        address_problem("example.com")


# --------------------------------------------------------------------------
# URL fetches through a mock transport

URL_POLICY = InputPolicy(allow_image_urls=True, max_image_bytes=10_000)
PUBLIC = "93.184.215.14"


def resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        if host in table:
            return table[host]
        raise socket.gaierror(f"unknown host {host}")

    return resolve


DNS = resolver(
    {
        "images.example": [PUBLIC],
        "internal.example": ["192.168.1.10"],
        "mixed.example": [PUBLIC, "10.0.0.7"],
    }
)


def test_fetch_connects_to_the_checked_address_with_the_name_kept() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=RED_PNG, headers={"content-type": "image/png"})

    data = fetch_image_bytes(
        "https://images.example/cat.png",
        URL_POLICY,
        transport=httpx.MockTransport(handler),
        resolve=DNS,
    )
    assert data == RED_PNG
    assert rgb_at(decode_image_bytes(data)) == (255, 0, 0)
    (request,) = seen
    assert request.url.host == PUBLIC and request.url.path == "/cat.png"
    assert request.headers["host"] == "images.example"
    assert request.extensions["sni_hostname"] == "images.example"


def test_fetch_size_cap_from_content_length() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"\0" * 20_000)

    with pytest.raises(ImageInputError, match="20000 bytes, over the limit of 10000"):
        fetch_image_bytes(
            f"http://{PUBLIC}/big.png", URL_POLICY, transport=httpx.MockTransport(handler)
        )


def test_fetch_size_cap_while_streaming_stops_early() -> None:
    produced: list[int] = []

    def chunks():
        for i in range(1000):
            produced.append(i)
            yield b"\0" * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())  # no content-length: chunked

    with pytest.raises(ImageInputError, match="passed the limit of 10000 bytes"):
        fetch_image_bytes(
            f"http://{PUBLIC}/stream.png", URL_POLICY, transport=httpx.MockTransport(handler)
        )
    assert len(produced) <= 12  # stopped right after the cap, not after 1 MB


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("http://10.0.0.5/x.png", "resolves to 10.0.0.5, a private address"),
        ("http://127.0.0.1:8080/admin", "loopback"),
        ("http://[::1]/x.png", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://internal.example/x.png", "resolves to 192.168.1.10, a private address"),
        ("http://mixed.example/x.png", "10.0.0.7"),
        ("file:///etc/passwd", "scheme 'file'"),
    ],
)
def test_redirect_to_a_forbidden_target_is_refused_before_connecting(
    location: str, expected: str
) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(302, headers={"location": location})

    with pytest.raises(ImageInputError) as info:
        fetch_image_bytes(
            "https://images.example/cat.png",
            URL_POLICY,
            transport=httpx.MockTransport(handler),
            resolve=DNS,
        )
    assert expected in str(info.value)
    assert hosts == [PUBLIC]  # the forbidden target was never contacted


def test_relative_redirect_is_followed_on_the_same_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old.png":
            return httpx.Response(301, headers={"location": "/new.png"})
        assert request.headers["host"] == "images.example"
        return httpx.Response(200, content=RED_PNG)

    data = fetch_image_bytes(
        "http://images.example/old.png",
        URL_POLICY,
        transport=httpx.MockTransport(handler),
        resolve=DNS,
    )
    assert data == RED_PNG


def test_redirect_loop_stops() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(307, headers={"location": f"/hop{len(calls)}"})

    with pytest.raises(ImageInputError, match=f"redirected more than {MAX_REDIRECTS} times"):
        fetch_image_bytes(
            f"http://{PUBLIC}/start", URL_POLICY, transport=httpx.MockTransport(handler)
        )
    assert len(calls) == MAX_REDIRECTS + 1


@pytest.mark.parametrize(
    ("url", "handler", "expected"),
    [
        (f"http://{PUBLIC}/x.png", lambda r: httpx.Response(404), "answered HTTP 404"),
        (
            f"http://{PUBLIC}/x.png",
            lambda r: httpx.Response(302),
            "answered HTTP 302",
        ),  # no Location
        (
            "http://nowhere.example/x.png",
            lambda r: httpx.Response(200),
            "Cannot resolve the image host 'nowhere.example'",
        ),
        ("http://192.168.0.1/x.png", lambda r: httpx.Response(200), "a private address"),
        ("http:///x.png", lambda r: httpx.Response(200), "has no host"),
    ],
)
def test_fetch_problems(url: str, handler, expected: str) -> None:
    with pytest.raises(ImageInputError, match=re.escape(expected)):
        fetch_image_bytes(url, URL_POLICY, transport=httpx.MockTransport(handler), resolve=DNS)


def test_fetch_transport_error_is_wrapped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ImageInputError, match=r"Cannot fetch the image .*ConnectError"):
        fetch_image_bytes(
            f"http://{PUBLIC}/x.png", URL_POLICY, transport=httpx.MockTransport(handler)
        )


def test_fetch_total_deadline_stops_a_trickling_server() -> None:
    def trickle():
        for _ in range(100):
            time.sleep(0.02)
            yield b"\0"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=trickle())

    policy = InputPolicy(allow_image_urls=True, url_timeout_s=0.1)
    start = time.perf_counter()
    with pytest.raises(ImageInputError, match="url_timeout_s"):
        fetch_image_bytes(
            f"http://{PUBLIC}/slow.png", policy, transport=httpx.MockTransport(handler)
        )
    assert time.perf_counter() - start < HANG_BOUND_S


def test_load_image_with_urls_allowed_still_checks_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An IP literal resolves without DNS, so this runs offline and never connects.
    monkeypatch.setattr(httpx.Client, "send", lambda *a, **k: pytest.fail("connected"))
    msg = raises_image_error("http://127.0.0.1:9/cat.png", InputPolicy(allow_image_urls=True))
    assert "resolves to 127.0.0.1, a loopback address" in msg


# --------------------------------------------------------------------------
# Robustness


def test_concurrent_loads_are_correct_and_leave_warning_filters_alone() -> None:
    before = list(warnings.filters)
    colours = [(i * 20, 255 - i * 20, 7) for i in range(8)]
    datas = [encode(Image.new("RGB", (32, 32), c), "PNG") for c in colours]
    results: dict[int, tuple[int, int, int]] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = rgb_at(load_image(datas[i]))
            with pytest.raises(ImageInputError):
                load_image(png_claiming(100_000, 100_000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == dict(enumerate(colours))
    assert warnings.filters == before


_SEEDS = [
    encode(noise_image((8, 8)), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    for fmt in ALLOWED_FORMATS
] + [
    encode(Image.new("RGBA", (5, 5), (1, 2, 3, 4)), "PNG"),
    encode(Image.new("I;16", (5, 5), 1000), "TIFF"),
    encode(Image.new("P", (5, 5), 3), "GIF", transparency=3),
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow chatters about corrupt TIFF tags
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=512), mutated_images()))
def test_any_bytes_give_rgb_or_image_input_error(data: bytes) -> None:
    policy = InputPolicy(max_image_pixels=1_000_000)
    try:
        im = load_image(data, policy)
    except ImageInputError as exc:
        assert str(exc)
    else:
        assert im.mode == "RGB" and im.width > 0 and im.height > 0
        im.tobytes()  # fully loaded
