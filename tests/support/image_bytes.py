"""Encoded image bytes built in the test: whole files through PIL, PNG chunks by hand."""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image


def encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """`im` saved in format `fmt` (PIL's `save` keywords pass through)."""
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC a decoder checks."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(image: Image.Image) -> bytes:
    """`image` as PNG bytes."""
    return encode(image, "PNG")


def b64(image: Image.Image) -> str:
    """`image` as base64 PNG text (the payload of a data URL)."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def data_url(image: Image.Image | None = None) -> str:
    """`image` (default: the 48x40 gradient) as a PNG data URL."""
    from safecode_guard.testing import gradient_image

    return "data:image/png;base64," + b64(image or gradient_image(48, 40))
