"""Image decode limits: decompression bombs, decode work and memory, per-request image limits, the process-wide budget.

Every bomb is built here, programmatically and small (a flat 40 M-pixel PNG is
a few hundred kB, built row by row). Peak memory is measured in a fresh
subprocess per case: the peak RSS during the work minus the RSS before it
(Linux's VmHWM, restarted just before the work; `ru_maxrss` elsewhere), so
cases do not see each other's high-water marks. Bounds are generous:
they sit between the fixed figure and the old one by a wide margin. No test
asserts a time.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from support.image_bytes import encode, png_chunk

import safecode_guard
from safecode_guard import images
from safecode_guard.config import InputPolicy
from safecode_guard.errors import ImageInputError, InputLimitError
from safecode_guard.images import (
    MAX_BMP_RLE_BYTES,
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    MAX_TIFF_BLOCKS,
    MAX_TIFF_TAGS,
    fetch_image_bytes,
    fit_within,
    image_working_side,
    jpeg_counts,
    load_image,
    load_images,
    processor_sides,
    structure_problem,
)
from safecode_guard.prompting import parse_messages
from safecode_guard.testing import FAMILIES

# --------------------------------------------------------------------------
# Builders of (bomb) images


def flat_png(width: int, height: int, pixel: bytes = b"\x80\x40\x20", colour_type: int = 2, depth: int = 8) -> bytes:
    """A PNG of one colour, compressed row by row: 40 M pixels take a few hundred kB and no pixel buffer."""
    row, packer = b"\x00" + pixel * width, zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _tiff(entries: list[tuple[int, int, int, int]], payload: bytes) -> bytes:
    """A little-endian TIFF: header, `payload` at offset 8, then one directory of `entries` (tag, type, count, value)."""
    ifd_offset = 8 + len(payload) + len(payload) % 2
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in sorted(entries):
        ifd += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 and count == 1 else struct.pack(
            "<HHII", tag, kind, count, value
        )
    return b"II*\x00" + struct.pack("<I", ifd_offset) + payload + b"\0" * (len(payload) % 2) + ifd + b"\0\0\0\0"


SHORT, LONG = 3, 4


def flat_tiff(width: int, height: int, sample_format: int, rows_per_strip: int = 64) -> bytes:
    """A deflate-compressed 32-bit one-band TIFF (float: sample_format 3, int: 2), every strip the same bytes."""
    strip = zlib.compress(struct.pack("<f" if sample_format == 3 else "<i", 3 if sample_format == 2 else 0.25) * width * rows_per_strip, 9)
    n = math.ceil(height / rows_per_strip)
    offsets_at = 8 + len(strip)
    counts_at = offsets_at + 4 * n
    payload = strip + struct.pack(f"<{n}I", *[8] * n) + struct.pack(f"<{n}I", *[len(strip)] * n)
    return _tiff(
        [(256, LONG, 1, width), (257, LONG, 1, height), (258, SHORT, 1, 32), (259, SHORT, 1, 8),
         (262, SHORT, 1, 1), (273, LONG, n, offsets_at), (277, SHORT, 1, 1), (278, LONG, 1, rows_per_strip),
         (279, LONG, n, counts_at), (339, SHORT, 1, sample_format)],
        payload,
    )


def tile_bomb_tiff(tile: int = 18912) -> bytes:
    """A ~150-byte 16x16 RGB TIFF declaring one `tile` x `tile` tile: libtiff allocates the whole tile."""
    data = zlib.compress(b"\0" * 64)
    bits_at = 8 + len(data)
    payload = data + struct.pack("<3H", 8, 8, 8)
    return _tiff(
        [(256, LONG, 1, 16), (257, LONG, 1, 16), (258, SHORT, 3, bits_at), (259, SHORT, 1, 8),
         (262, SHORT, 1, 2), (277, SHORT, 1, 3), (284, SHORT, 1, 1), (322, LONG, 1, tile),
         (323, LONG, 1, tile), (324, LONG, 1, 8), (325, LONG, 1, len(data))],
        payload,
    )


def progressive_scan_bomb(side: int, repeats: int) -> bytes:
    """A flat progressive JPEG whose last scan is repeated `repeats` times (each pass costs the whole image)."""
    data = encode(Image.new("RGB", (side, side), (90, 120, 150)), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def zstd_bomb(mib: int) -> bytes:
    """`mib` MiB of zeros as zstd frames of 1 MiB each: a few kB."""
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor(level=3).compress(b"\0" * (1 << 20)) * mib


def gzip_bomb(mib: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1 << 20)
    return b"".join(packer.compress(block) for _ in range(mib)) + packer.flush()


RED_PNG = encode(Image.new("RGB", (4, 3), (255, 0, 0)), "PNG")
BIG = (7812, 5120)  # 39,997,440 pixels: just under the default max_image_pixels


def user(*values: object) -> list[dict[str, object]]:
    return [{"role": "user", "content": [*({"type": "image", "image": v} for v in values), "What is this?"]}]


# --------------------------------------------------------------------------
# Peak memory of one case, in a fresh interpreter

_MEASURE = r"""
import json, re, resource, sys, time
from pathlib import Path
from PIL import Image
from safecode_guard.config import InputPolicy
from safecode_guard.images import load_image
from safecode_guard.prompting import parse_messages

def vm(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

case, data = json.loads(sys.argv[1]), Path(sys.argv[2]).read_bytes()
load_image(Path(sys.argv[3]).read_bytes())  # warm the imports and Pillow's plugins
{setup}
try:  # restart the peak at the current use (Linux), so earlier transient peaks cannot hide the work's
    Path("/proc/self/clear_refs").write_text("5")
    before, peak = vm("VmRSS"), lambda: vm("VmHWM")
except OSError:
    before, peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    {work}
except Exception as exc:
    result = f"{{type(exc).__name__}}: {{exc}}"
seconds = time.perf_counter() - start
print(json.dumps({{"mb": (peak() - before) / 1024, "seconds": seconds, "result": str(result)}}))
"""


def measure(data: bytes, work: str, setup: str = "", **case: object) -> dict[str, object]:
    """Run `work` (Python, sets `result`; `data` and `case` in scope) on `data` in a fresh process.

    Returns `{"mb": peak RSS growth during the work, "seconds", "result"}`.
    """
    script = _MEASURE.format(setup=setup or "pass", work=work)
    package_root = str(Path(safecode_guard.__file__).resolve().parents[1])
    # Large blocks straight from and back to the OS, as `safecode-guard serve` sets it: the peak then
    # measures what decoding holds at once, not what glibc keeps in per-thread arenas afterwards.
    env = {**os.environ, "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    with tempfile.TemporaryDirectory() as tmp:
        path, tiny = Path(tmp) / "input", Path(tmp) / "tiny.png"
        path.write_bytes(data)
        tiny.write_bytes(RED_PNG)
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(case), str(path), str(tiny)],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# 5. Decode work: scans and other per-structure costs are counted before decoding


def test_progressive_scan_bomb_is_refused_before_decoding() -> None:
    bomb = progressive_scan_bomb(1024, 700)
    assert bomb.count(b"\xff\xda") > 700 and jpeg_counts(bomb)[0] > MAX_JPEG_SCANS  # counting stops past the limit
    with pytest.raises(ImageInputError, match=f"more than {MAX_JPEG_SCANS} scans") as info:
        load_image(bomb)
    assert "scan bomb" in str(info.value)


def test_real_progressive_and_baseline_jpegs_still_decode() -> None:
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    for kwargs in ({"progressive": True}, {}, {"progressive": True, "subsampling": 0}):
        data = encode(photo, "JPEG", quality=90, **kwargs)
        scans, segments = jpeg_counts(data)
        assert 1 <= scans <= 12 and segments < 40, (kwargs, scans, segments)
        assert load_image(data).size == (128, 96)
    cmyk = encode(Image.new("CMYK", (64, 64), (10, 20, 30, 40)), "JPEG", progressive=True)
    assert jpeg_counts(cmyk)[0] <= MAX_JPEG_SCANS and load_image(cmyk).mode == "RGB"


def test_jpeg_walk_skips_stuffed_bytes_restart_markers_and_trailing_data() -> None:
    data = encode(Image.new("RGB", (64, 64), (255, 255, 255)), "JPEG", restart_marker_blocks=1)
    scans, _ = jpeg_counts(data)
    assert scans == 1
    # Data after the first image's end (a second MPO frame, a motion photo's video) is never decoded.
    assert jpeg_counts(data + progressive_scan_bomb(64, 200))[0] == 1
    assert structure_problem(data + progressive_scan_bomb(64, 200)) is None


def _gif_with_blocks(n: int) -> bytes:
    gif = encode(Image.new("P", (8, 8)), "GIF")
    flags = gif[10]
    at = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    return gif[:at] + b"\x21\xfe" + b"\x01x" * n + b"\x00" + gif[at:]


def _bmp_rle(n_bytes: int) -> bytes:
    width, height = 4000, max(1, n_bytes // 8002)
    body = (b"\x01\x07" * 4000 + b"\x00\x00") * height + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + 40 + 1024
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + b"\0" * 1024 + body


def _jpeg_with_segments(n: int) -> bytes:
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * n + jpeg[2:]


def _png_with_chunks(n: int) -> bytes:
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    return png[:33] + png_chunk(b"abCd", b"") * n + png[33:]


def _tiff_with_strips(n: int) -> bytes:
    payload = b"\0" * n + struct.pack(f"<{n}I", *range(8, 8 + n)) + struct.pack(f"<{n}I", *[1] * n)
    return _tiff(
        [(256, LONG, 1, 1), (257, LONG, 1, n), (258, SHORT, 1, 8), (259, SHORT, 1, 1), (262, SHORT, 1, 1),
         (273, LONG, n, 8 + n), (277, SHORT, 1, 1), (278, LONG, 1, 1), (279, LONG, n, 8 + 5 * n)],
        payload,
    )


def _tiff_with_tags(n: int) -> bytes:
    base = [(256, LONG, 1, 1), (257, LONG, 1, 1), (258, SHORT, 1, 8), (259, SHORT, 1, 1), (262, SHORT, 1, 1),
            (273, LONG, 1, 8), (277, SHORT, 1, 1), (278, LONG, 1, 1), (279, LONG, 1, 1)]
    return _tiff(base + [(40000 + i, SHORT, 1, 0) for i in range(n)], b"\0\0")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_jpeg_with_segments(MAX_JPEG_SEGMENTS + 10), "marker segments"),
        (_png_with_chunks(MAX_PNG_CHUNKS + 10), "chunks"),
        (_gif_with_blocks(MAX_GIF_BLOCKS + 10), "extension blocks"),
        (_tiff_with_strips(MAX_TIFF_BLOCKS + 10), "strips or tiles"),
        (_tiff_with_tags(MAX_TIFF_TAGS + 10), "entries"),
        (_bmp_rle(MAX_BMP_RLE_BYTES + 100_000), "run-length-encoded BMP"),
    ],
    ids=["jpeg-segments", "png-chunks", "gif-blocks", "tiff-strips", "tiff-tags", "bmp-rle"],
)
def test_structures_that_cost_python_steps_per_byte_are_refused(data: bytes, expected: str) -> None:
    # Each of these parsed (and decoded) for seconds, some with a gigabyte (3 M TIFF strips: 20 s, 1.1 GB).
    with pytest.raises(ImageInputError, match=expected):
        load_image(data)


def test_structures_just_under_the_limits_decode() -> None:
    for data in (_jpeg_with_segments(100), _png_with_chunks(1000), _gif_with_blocks(1000), _tiff_with_strips(300)):
        assert structure_problem(data) is None
        assert load_image(data).mode == "RGB"


def test_one_slow_decode_does_not_hold_up_other_images() -> None:
    # The process-wide lock made a 1x1 PNG wait 9.2 s behind a JPEG bomb.
    entered, release = threading.Event(), threading.Event()

    class SlowImage(Image.Image):
        def load(self):  # a decode that takes as long as the test wants
            entered.set()
            release.wait(30)
            return super().load()

    slow = Image.new("RGB", (8, 8))
    slow.__class__ = SlowImage
    blocked = threading.Thread(target=load_image, args=(slow,))
    blocked.start()
    try:
        assert entered.wait(10)
        done: list[Image.Image] = []
        other = threading.Thread(target=lambda: done.append(load_image(RED_PNG)))
        other.start()
        other.join(10)  # a hang bound, not a timing: it returns at once, or never did before
        assert done and done[0].getpixel((0, 0)) == (255, 0, 0)
    finally:
        release.set()
        blocked.join()


# --------------------------------------------------------------------------
# 6. Memory: downscaled early to a working size; peak RSS per case


def test_fit_within_pure() -> None:
    assert fit_within((100, 50), None) is None
    assert fit_within((100, 50), 100) is None
    assert fit_within((100, 50), 10) == (10, 5)
    assert fit_within((50, 100), 10) == (5, 10)
    assert fit_within((10_000, 3), 100) == (100, 1)  # never 0 wide


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "I", "F", "CMYK", "1", "LA"])
def test_load_image_downscales_every_mode_to_max_side(mode: str) -> None:
    im = Image.new(mode, (400, 100), 1 if mode == "1" else None)
    if mode == "P":
        im.putpalette([0, 0, 255] * 256)
    fmt = "TIFF" if mode in ("I", "F", "CMYK") else "PNG"
    out = load_image(encode(im, fmt), max_side=40)
    assert out.mode == "RGB" and out.size == (40, 10)


@pytest.mark.parametrize(
    "mode", ["I;16", "I;16B", "I;16L", "I;16N", "I", "F", "LAB", "HSV", "YCbCr", "RGBX", "RGBa", "La", "PA"]
)
def test_caller_images_of_every_mode_downscale(mode: str) -> None:
    out = load_image(Image.new(mode, (200, 100)), max_side=20)
    assert out.mode == "RGB" and out.size == (20, 10)


def test_downscaled_values_match_full_size_conversion() -> None:
    # High-depth images keep the full-size value range; transparency is composited before resizing.
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    full = np.asarray(load_image(encode(Image.fromarray(ramp), "PNG")).resize((64, 16), Image.Resampling.BOX))
    small = np.asarray(load_image(encode(Image.fromarray(ramp), "PNG"), max_side=64))
    assert np.abs(full.astype(int) - small.astype(int)).max() <= 2
    wide = np.tile(np.linspace(-1000, 1000, 200).astype(np.int32), (20, 1))
    small = np.asarray(load_image(encode(Image.fromarray(wide), "TIFF"), max_side=20))
    assert small[..., 0].min() <= 10 and small[..., 0].max() >= 245  # stretched by the full range
    half = load_image(encode(Image.new("RGBA", (300, 300), (255, 0, 0, 128)), "PNG"), max_side=30)
    assert max(abs(a - b) for a, b in zip(half.getpixel((15, 15)), (255, 127, 127), strict=True)) <= 2


def test_exif_orientation_survives_downscaling() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(encode(Image.new("RGB", (400, 200), (0, 0, 255)), "JPEG", exif=exif), max_side=40)
    assert out.size == (20, 40)


def test_max_side_is_validated_and_the_policy_cap_applies() -> None:
    assert load_image(encode(Image.new("RGB", (300, 30)), "PNG"), InputPolicy(max_working_side=60)).size == (60, 6)
    assert load_image(encode(Image.new("RGB", (300, 30)), "PNG"), InputPolicy(max_working_side=60), max_side=600).size == (60, 6)
    with pytest.raises(ValueError, match="max_side"):
        load_image(RED_PNG, max_side=0)
    caller = Image.new("RGB", (300, 30))
    assert load_image(caller, max_side=30).size == (30, 3) and caller.size == (300, 30)


def test_jpeg_is_decoded_small_by_draft() -> None:
    data = encode(Image.new("RGB", (4096, 4096), (30, 60, 90)), "JPEG", quality=90)
    seen: list[tuple[int, int]] = []
    original = Image.Image.resize

    def spy(self: Image.Image, size, *args, **kwargs):
        seen.append(self.size)
        return original(self, size, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", spy)
        out = load_image(data, max_side=500)
    assert out.size == (500, 500)
    assert seen == [(512, 512)]  # libjpeg decoded at 1/8 scale: the 4096 x 4096 pixels never existed


@pytest.mark.soak
@pytest.mark.parametrize(
    ("case", "build", "bound_mb"),
    [
        ("16-bit grey PNG, 40 M px", lambda: flat_png(*BIG, pixel=b"\x12\x34", colour_type=0, depth=16), 250),
        ("float TIFF, 40 M px", lambda: flat_tiff(*BIG, sample_format=3), 400),
        ("int32 TIFF, 40 M px", lambda: flat_tiff(*BIG, sample_format=2), 400),
        ("146-byte TIFF declaring an 18912^2 tile", tile_bomb_tiff, 60),
        ("RGB PNG, 40 M px", lambda: flat_png(*BIG), 300),
    ],
    ids=["png16", "tiff-float", "tiff-int32", "tiff-tile-bomb", "png-rgb"],
)
def test_peak_memory_of_one_image(case: str, build, bound_mb: int) -> None:
    # Before: 1.11 GB, 1.27 GB, 1.27 GB, 1.07 GB, ~1 GB.
    data = build()
    got = measure(data, "result = load_image(data).size")
    assert got["mb"] < bound_mb, (case, got)
    if "tile" in case:
        assert got["result"].startswith("ImageInputError") and "tiles" in got["result"]
    else:
        assert got["result"] == str(fit_within(BIG, InputPolicy().max_working_side)), got


def _gradient(mode: str, size: tuple[int, int]) -> Image.Image:
    """A smooth image (cheap to encode, but real pixels to decode) in `mode`."""
    width, height = size
    ramp = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
    rgb = Image.fromarray(np.dstack([ramp, ramp[::-1], np.full_like(ramp, 90)]))
    if mode == "RGBA":
        return Image.fromarray(np.dstack([np.asarray(rgb), ramp]))
    return rgb.convert(mode)


@pytest.mark.soak
@pytest.mark.parametrize(
    ("case", "build"),
    [
        ("lossless WEBP with alpha, 20 M px", lambda: encode(_gradient("RGBA", (5000, 4000)), "WEBP", lossless=True)),
        ("RGBA PNG, 40 M px", lambda: encode(_gradient("RGBA", BIG), "PNG", compress_level=1)),
        ("palette PNG with transparency, 40 M px", lambda: encode(_gradient("P", BIG), "PNG", transparency=0, compress_level=1)),
        ("progressive CMYK JPEG, 40 M px", lambda: encode(_gradient("CMYK", BIG), "JPEG", progressive=True)),
        ("JPEG-compressed TIFF, 20 M px", lambda: encode(_gradient("RGB", (5000, 4000)), "TIFF", compression="jpeg")),
    ],
    ids=["webp-rgba", "png-rgba", "png-palette-alpha", "jpeg-progressive-cmyk", "tiff-jpeg"],
)
def test_decode_memory_stays_within_its_estimate(case: str, build) -> None:
    # The review's second round: formats whose decoders hold several full-size copies
    # (WEBP 613-680 MB at 40 M px) went past the README's figures; the estimate that
    # `max_decode_mb` is checked against must bound what decoding really takes.
    data = build()
    estimate_mb = images.decode_memory_estimate(images.open_image_bytes(data)) / 2**20
    got = measure(data, "result = load_image(data).size")
    assert got["result"] == str(fit_within(Image.open(io.BytesIO(data)).size, InputPolicy().max_working_side)), got
    assert got["mb"] <= estimate_mb, (case, got, estimate_mb)


def test_an_image_over_the_decode_budget_is_refused_before_decoding() -> None:
    webp = encode(_gradient("RGB", BIG), "WEBP", lossless=True)  # 40 M px: about 725 MB to decode
    got = measure(webp, "result = load_image(data).size")
    assert got["result"].startswith("ImageInputError") and "max_decode_mb" in got["result"], got
    assert got["mb"] < 30 and got["seconds"] < 0.5, got
    assert load_image(webp, InputPolicy(max_decode_mb=1024)).size == fit_within(BIG, 2048)  # a bigger budget lets it in


def test_progressive_jpeg_inside_a_tiff_counts_its_scans() -> None:
    side = 512
    jpeg = encode(_gradient("RGB", (side, side)), "JPEG", progressive=True)
    end, last = jpeg.rfind(b"\xff\xd9"), jpeg.rfind(b"\xff\xda")
    bomb = jpeg[:end] + jpeg[last:end] * 100 + jpeg[end:]  # the last scan repeated
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 7), (262, 3, 6), (273, 4, 0), (277, 3, 3),
               (278, 4, side), (279, 4, len(bomb)), (284, 3, 1)]
    header = 8 + 2 + 12 * len(entries) + 4
    tiff = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = header if tag == 273 else value
        tiff += struct.pack("<HHIHH", tag, kind, 1, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, 1, value)
    tiff += struct.pack("<I", 0) + bomb
    problem = structure_problem(tiff)
    assert problem is not None and f"more than {MAX_JPEG_SCANS} scans" in problem
    with pytest.raises(ImageInputError, match="scans"):
        load_image(tiff)


@pytest.mark.soak
def test_engine_path_memory_with_the_working_size() -> None:
    # What the engine does: parse_messages at the processor's working size, then the noised copy.
    # Before: 2.45 GB for one 40 M-pixel PNG (the noised copy alone 1.84 GB).
    got = measure(
        flat_png(*BIG),
        "messages = [{'role': 'user', 'content': [{'type': 'image', 'image': data}, 'hi']}]\n"
        "    conv = parse_messages(messages, InputPolicy(), max_side=case['side'])\n"
        "    noised = noised_image(conv.images[0], 0.1, torch.Generator().manual_seed(0))\n"
        "    result = (conv.images[0].size, noised.size)",
        setup="import torch\nfrom safecode_guard.ops import noised_image",
        side=1344,
    )
    assert got["mb"] < 300, got
    assert got["result"] == str(((1344, 881), (1344, 881)))


# --------------------------------------------------------------------------
# 7. Request limits: counted before any image is decoded


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode the image pipeline (`safecode_guard.images`) starts."""
    calls: list[str] = []
    for name in ("decode_opened", "decode_pil"):
        original = getattr(images, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(images, name, spy)
    return calls


def test_image_count_is_checked_before_decoding_any(decodes: list[str]) -> None:
    with pytest.raises(InputLimitError, match="holds 3 images; the limit is 2"):
        parse_messages(user(RED_PNG, RED_PNG, RED_PNG), InputPolicy(max_images=2))
    assert decodes == []


def test_forty_large_images_are_refused_at_once(decodes: list[str]) -> None:
    # Before: 25 s, then an untyped MemoryError (a 4.7 MB request).
    big = flat_png(*BIG)
    with pytest.raises(InputLimitError, match="holds 40 images"):
        parse_messages(user(*[big] * 40), InputPolicy())
    assert decodes == []


def test_total_declared_pixels_are_checked_before_decoding_any(decodes: list[str]) -> None:
    big = flat_png(*BIG)
    with pytest.raises(InputLimitError, match="max_total_image_pixels"):
        parse_messages(user(*[big] * 5), InputPolicy())
    assert decodes == []
    with pytest.raises(InputLimitError, match="max_total_image_pixels"):
        load_images([Image.new("RGB", (100, 100))] * 3, InputPolicy(max_total_image_pixels=29_999))
    assert decodes == []


def test_total_bytes_are_checked_before_decoding_any(decodes: list[str]) -> None:
    with pytest.raises(InputLimitError, match="max_total_image_bytes"):
        parse_messages(user(RED_PNG, RED_PNG), InputPolicy(max_total_image_bytes=len(RED_PNG) + 1))
    assert decodes == []
    assert len(parse_messages(user(RED_PNG, RED_PNG), InputPolicy(max_total_image_bytes=2 * len(RED_PNG))).images) == 2


def test_langchain_conversion_counts_before_decoding(decodes: list[str]) -> None:
    import base64

    from langchain_core.messages import HumanMessage

    from safecode_guard.lc_messages import to_hf_messages

    block = {"type": "image", "base64": base64.b64encode(RED_PNG).decode(), "mime_type": "image/png"}
    with pytest.raises(InputLimitError, match="holds 3 images"):
        to_hf_messages([HumanMessage(content=[block, block]), HumanMessage(content=[block])], InputPolicy(max_images=2))
    assert decodes == []
    [hf] = to_hf_messages([HumanMessage(content=[block, "hi"])], InputPolicy(), max_side=2)
    assert hf["content"][0]["image"].size == (2, 2)  # 4x3 -> 2x2 (1.5 rounds up)


def test_parse_messages_passes_max_side_through() -> None:
    conv = parse_messages(user(encode(Image.new("RGB", (640, 480)), "PNG")), InputPolicy(), max_side=64)
    assert conv.images[0].size == (64, 48)
    assert conv.messages[0]["content"][0]["image"] is conv.images[0]


# --------------------------------------------------------------------------
# 9. Compressed downloads: decompressed bytes counted as they are produced

URL_POLICY = InputPolicy(allow_image_urls=True, max_image_bytes=100_000)
PUBLIC_URL = "http://93.184.215.14/x.png"


def fetch_streamed(body: bytes, encoding: str, policy: InputPolicy = URL_POLICY, seen: list | None = None) -> bytes:
    def handler(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        # A generator body is streamed, as from a real server (bytes would be read up front).
        return httpx.Response(200, headers={"content-encoding": encoding}, content=iter([body]))

    return fetch_image_bytes(PUBLIC_URL, policy, transport=httpx.MockTransport(handler))


def test_downloads_ask_for_uncompressed_images() -> None:
    seen: list[httpx.Request] = []
    fetch_streamed(RED_PNG, "identity", seen=seen)
    assert seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda d: zlib.compress(d)[2:-4]),  # raw deflate, as some servers send
        ("zstd", lambda d: pytest.importorskip("zstandard").ZstdCompressor().compress(d)),
        ("identity", lambda d: d),
    ],
)
def test_compressed_downloads_decode(encoding: str, compress) -> None:
    png = encode(Image.new("RGB", (32, 32), (0, 128, 255)), "PNG")
    assert fetch_streamed(compress(png), encoding) == png


@pytest.mark.parametrize(("encoding", "bomb"), [("zstd", zstd_bomb), ("gzip", gzip_bomb)])
def test_compression_bombs_stop_at_the_cap_typed(encoding: str, bomb) -> None:
    with pytest.raises(ImageInputError, match="passed the limit of 100000 bytes"):
        fetch_streamed(bomb(64), encoding)


def test_unsupported_content_encoding_is_a_typed_error() -> None:
    with pytest.raises(ImageInputError, match="Content-Encoding 'br'"):
        fetch_streamed(b"\x0b\x02\x80hello\x03", "br")
    with pytest.raises(ImageInputError, match="corrupt"):
        fetch_streamed(b"\x1f\x8b\x08\x00garbage-not-deflate", "gzip")


@pytest.mark.soak
def test_zstd_bomb_peak_memory() -> None:
    # Before: a 16 KiB body grew to 1.07 GB before the cap tripped; 48 KiB gave an untyped MemoryError.
    body = zstd_bomb(1024)  # 1 GiB of zeros in ~16 KiB
    got = measure(
        body,
        "def handler(request):\n"
        "        return httpx.Response(200, headers={'content-encoding': 'zstd'}, content=iter([data]))\n"
        "    policy = InputPolicy(allow_image_urls=True)\n"
        "    result = fetch_image_bytes('http://93.184.215.14/x.png', policy, transport=httpx.MockTransport(handler))",
        setup="import httpx\nfrom safecode_guard.images import fetch_image_bytes",
    )
    assert got["result"].startswith("ImageInputError") and "passed the limit of 25000000 bytes" in got["result"]
    assert got["mb"] < 120, got


# --------------------------------------------------------------------------
# 14. Local files: opened beneath the root, component by component


_SWAPPER = """
import os, sys, time
root, outside = sys.argv[1], sys.argv[2]
d, d_real = os.path.join(root, "d"), os.path.join(root, "d_real")
print("ready", flush=True)
while True:
    os.rename(d, d_real)
    os.symlink(outside, d)
    os.unlink(d)
    os.rename(d_real, d)
    time.sleep(0.0002)  # leave the real folder in place a while, so loads also succeed
"""


def test_swapping_a_folder_for_a_symlink_never_escapes_the_root(tmp_path: Path) -> None:
    # Before: 520 of 3,000 loads escaped, and errors quoted the outside file's first 40 characters.
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "img.png").write_bytes(RED_PNG)
    (root / "d" / "notes.txt").write_text("inside notes, harmless")
    (outside / "img.png").write_bytes(encode(Image.new("RGB", (4, 3), (0, 0, 255)), "PNG"))
    (outside / "notes.txt").write_text("SECRET=hunter2 " * 4)
    policy = InputPolicy(allow_local_files=True, local_files_root=str(root))
    # Another process swaps the folder for a symlink and back, as fast as it can, on another core.
    swapper = subprocess.Popen(
        [sys.executable, "-c", _SWAPPER, str(root), str(outside)], stdout=subprocess.PIPE, text=True
    )
    escapes, errors, loaded = [], [], 0
    try:
        assert swapper.stdout is not None and swapper.stdout.readline().strip() == "ready"
        for i in range(2000):
            name = "d/img.png" if i % 2 else "d/notes.txt"
            try:
                colour = load_image(name, policy).getpixel((0, 0))
            except ImageInputError as exc:
                errors.append(str(exc))
            else:
                loaded += 1
                if colour != (255, 0, 0):
                    escapes.append(name)
    finally:
        swapper.kill()
        swapper.wait()
    assert escapes == []
    assert not [e for e in errors if "SECRET" in e or "hunter2" in e]
    assert loaded > 0 and any("looks like text" in e for e in errors)  # the inside files were read


def test_a_folder_swapped_between_any_two_steps_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race made deterministic: the swap happens right before the n-th open() of one load.
    # Before, the check (resolve) and the single open of the full path were two steps apart.
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    (root / "d" / "img.png").write_bytes(RED_PNG)
    (outside / "img.png").write_bytes(encode(Image.new("RGB", (4, 3), (0, 0, 255)), "PNG"))
    (outside / "notes.txt").write_text("SECRET=hunter2 " * 4)
    (root / "d" / "notes.txt").write_text("inside notes, harmless")
    policy = InputPolicy(allow_local_files=True, local_files_root=str(root))
    real_open = os.open
    outcomes = []
    for name in ("d/img.png", "d/notes.txt"):
        for step in range(1, 6):
            opens, swapped = [], []

            def racing_open(path, flags, mode=0o777, *, dir_fd=None, _step=step, _opens=opens, _swapped=swapped):
                _opens.append(path)
                if len(_opens) == _step:
                    os.rename(root / "d", root / "d_real")
                    os.symlink(outside, root / "d")
                    _swapped.append(True)
                return real_open(path, flags, mode, dir_fd=dir_fd)

            monkeypatch.setattr(os, "open", racing_open)
            monkeypatch.setattr(os, "supports_dir_fd", os.supports_dir_fd | {racing_open})
            try:
                outcomes.append((name, step, load_image(name, policy).getpixel((0, 0))))
            except ImageInputError as exc:
                outcomes.append((name, step, str(exc)))
            finally:
                monkeypatch.undo()
                if swapped:
                    os.unlink(root / "d")
                    os.rename(root / "d_real", root / "d")
    assert not [o for o in outcomes if o[2] == (0, 0, 255)], outcomes  # never the outside image
    assert not [o for o in outcomes if "SECRET" in str(o[2])], outcomes  # never its content
    assert {o[2] for o in outcomes if o[0] == "d/img.png"} >= {(255, 0, 0)}


def test_symlinks_inside_the_root_are_followed_and_outside_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "img.png").write_bytes(RED_PNG)
    (tmp_path / "secret.png").write_bytes(RED_PNG)
    (root / "rel").symlink_to("a/b")
    (root / "up").symlink_to("../a", target_is_directory=True)  # climbs out, then back in: refused
    (root / "a" / "back").symlink_to("../a/b/img.png")
    (root / "loop").symlink_to("loop")
    (root / "esc").symlink_to("../secret.png")
    policy = InputPolicy(allow_local_files=True, local_files_root=str(root))
    assert load_image("rel/img.png", policy).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(Path("a/back"), policy).getpixel((0, 0)) == (255, 0, 0)
    assert load_image("a/b/../b/img.png", policy).getpixel((0, 0)) == (255, 0, 0)
    for name, expected in [
        ("up/b/img.png", "through a symlink"),
        ("esc", "through a symlink"),
        ("loop", "more than 40 symlinks"),
        ("a/b/img.png/x", "does not exist"),
        ("a/..", "not a regular file"),
    ]:
        with pytest.raises(ImageInputError, match=expected):
            load_image(Path(name), policy)  # a Path: "esc" alone would read as base64


def test_local_file_errors_never_quote_the_file(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("-----BEGIN PRIVATE KEY----- abc")
    (tmp_path / "blob.bin").write_bytes(bytes(range(200, 256)) * 4)
    policy = InputPolicy(allow_local_files=True, local_files_root=str(tmp_path))
    for name in ("key.txt", "blob.bin"):
        with pytest.raises(ImageInputError) as info:
            load_image(name, policy)
        assert "BEGIN" not in str(info.value) and "c8 c9" not in str(info.value)
    # Bytes the caller passed in are theirs: quoting them helps (a path passed as bytes, say).
    with pytest.raises(ImageInputError, match="BEGIN PRIVATE"):
        load_image(b"-----BEGIN PRIVATE KEY----- abc")


# --------------------------------------------------------------------------
# The working size a processor needs


def test_working_side_from_real_processor_settings() -> None:
    policy = InputPolicy()
    clip = SimpleNamespace(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    qwen = SimpleNamespace(size={"shortest_edge": 3136, "longest_edge": 12845056}, merge_size=2, patch_size=14)
    idefics3 = SimpleNamespace(size={"longest_edge": 1456}, max_image_size={"longest_edge": 364})
    siglip = SimpleNamespace(size={"height": 224, "width": 224})
    mllama = SimpleNamespace(size={"height": 560, "width": 560}, max_image_tiles=4)
    assert processor_sides(qwen) == [56.0, 3584.0]
    assert image_working_side(clip, policy) == 4 * 336
    assert image_working_side(SimpleNamespace(image_processor=siglip), policy) == 4 * 224
    for big in (qwen, idefics3, mllama):
        assert image_working_side(big, policy) == policy.max_working_side == 2048
    assert image_working_side(SimpleNamespace(), policy) == 2048  # unknown: the cap
    assert image_working_side(clip, InputPolicy(max_working_side=512)) == 512


@pytest.mark.parametrize("family", FAMILIES)
def test_working_side_keeps_processor_output_close(family: str, tiny_model_dir) -> None:
    from transformers import AutoProcessor

    from safecode_guard.testing import gradient_image, stripes_image

    processor = AutoProcessor.from_pretrained(tiny_model_dir(family))
    side = image_working_side(processor, InputPolicy())
    sides = processor_sides(processor.image_processor)
    assert max(sides) < side <= 2048
    full = Image.blend(gradient_image(1280, 800), stripes_image(1280, 800, period=200), 0.5)
    small = load_image(full, max_side=side)
    assert max(small.size) == side

    def pixels(im: Image.Image) -> np.ndarray:
        out = processor.image_processor(images=[im], return_tensors="np")["pixel_values"]
        return np.asarray(out, dtype=np.float32)

    a, b = pixels(full), pixels(small)
    assert a.shape == b.shape
    spread = float(a.max() - a.min())
    # Measured: 0.03-0.08% of the value range on every family (the largest single value 0.5%).
    assert float(np.abs(a - b).mean()) < 0.003 * spread, (family, side, float(np.abs(a - b).mean()), spread)


# --------------------------------------------------------------------------
# One decode-memory budget for every request of the process

_CONCURRENT = r"""
import io, json, re, sys, threading
from pathlib import Path
import numpy as np
from PIL import Image
from safecode_guard.images.budget import decode_memory_budget, set_decode_memory_budget
from safecode_guard.images import load_image

def vm(field):
    return int(re.search(field + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

side, n, budget = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
ramp = (np.add.outer(np.arange(side), np.arange(side)) % 256).astype(np.uint8)
buf = io.BytesIO()
Image.fromarray(np.dstack([ramp, ramp[::-1], np.full_like(ramp, 90)])).save(buf, "WEBP", lossless=True)
data = buf.getvalue()
del ramp
load_image(data)  # warm Pillow's decoder
set_decode_memory_budget(budget, max_wait_s=300)
Path("/proc/self/clear_refs").write_text("5")
before = vm("VmRSS")
start, sizes = threading.Barrier(n), []

def one():
    start.wait()
    sizes.append(load_image(data).size)

threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"mb": (vm("VmHWM") - before) / 1024, "done": len(sizes), "held_mb": decode_memory_budget.peak / 2**20}))
"""


def _concurrent_decodes(side: int, n: int, budget_mb: int | None) -> dict[str, float]:
    package_root = str(Path(safecode_guard.__file__).resolve().parents[1])
    # Large blocks straight from and back to the OS, as `safecode-guard serve` sets it: the peak then
    # measures what decoding holds at once, not what glibc keeps in per-thread arenas afterwards.
    env = {**os.environ, "PYTHONPATH": package_root, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 20)}
    out = subprocess.run(
        [sys.executable, "-c", _CONCURRENT, str(side), str(n), json.dumps(budget_mb)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.soak
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS per case needs Linux")
def test_concurrent_decodes_stay_within_one_process_budget() -> None:
    """Six requests each decode a 2400x2400 lossless WEBP (about 104 MB to decode by the estimate; each
    within the per-image cap). Without a shared budget they decode together; with 256 MB, two at a time."""
    free = _concurrent_decodes(2400, 6, None)
    held = _concurrent_decodes(2400, 6, 256)
    assert free["done"] == held["done"] == 6
    assert held["held_mb"] <= 256
    assert held["mb"] < 256 + 96, held  # the budget plus the interpreter's own growth
    assert free["mb"] > 1.6 * held["mb"], (free, held)


def test_the_budget_makes_decodes_wait_then_refuses_past_the_wait() -> None:
    from safecode_guard.errors import OverloadedError
    from safecode_guard.images.budget import DecodeMemoryBudget

    budget = DecodeMemoryBudget(64, max_wait_s=5)
    mb = 2**20
    entered = threading.Event()
    release = threading.Event()

    def hold_most() -> None:
        with budget.hold(48 * mb):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold_most)
    holder.start()
    assert entered.wait(10)
    got: list[str] = []
    waiter = threading.Thread(target=lambda: (budget.hold(32 * mb).__enter__(), got.append("in")))
    waiter.start()
    waiter.join(0.3)
    assert got == [] and budget.used == 48 * mb  # no room: it waits
    release.set()
    waiter.join(10)
    holder.join(10)
    assert got == ["in"] and budget.peak <= 64 * mb
    budget.used = 0
    impatient = DecodeMemoryBudget(64, max_wait_s=0.2)
    with impatient.hold(60 * mb):
        result: list[BaseException] = []
        t = threading.Thread(target=lambda: result.append(_raises(lambda: impatient.hold(16 * mb).__enter__())))
        t.start()
        t.join(10)
    assert isinstance(result[0], OverloadedError) and "budget" in str(result[0]) and impatient.refused == 1
    with impatient.hold(10 * 64 * mb):  # larger than the whole budget: runs alone, when nothing else does
        assert impatient.used == 10 * 64 * mb


def test_a_cancelled_request_stops_waiting_for_decode_room() -> None:
    from safecode_guard.control import RequestControl, use_control
    from safecode_guard.errors import RequestCancelledError
    from safecode_guard.images.budget import DecodeMemoryBudget

    budget = DecodeMemoryBudget(64, max_wait_s=30)
    control = RequestControl()
    result: list[BaseException] = []

    def wait_for_room() -> None:
        with use_control(control):
            result.append(_raises(lambda: budget.hold(32 * 2**20).__enter__()))

    with budget.hold(60 * 2**20):
        t = threading.Thread(target=wait_for_room)
        t.start()
        time.sleep(0.2)
        control.cancel()
        t.join(5)
    assert isinstance(result[0], RequestCancelledError)


def _raises(fn: Any) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None
