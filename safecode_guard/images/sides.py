"""The working size images are kept at, read from a Hugging Face processor's settings."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..config import InputPolicy

__all__ = [
    "WORKING_SIDE_MARGIN",
    "image_working_side",
    "processor_sides",
]

#: Factor between the largest side a processor resizes an image to and the working side we keep:
#: 2 so that the processor's own resize from the working size matches its resize from full size
#: (two antialiased downscales are close to one), times 2 so that shortest-edge and fixed-size
#: processors keep that margin on images up to 2:1 (beyond that the short side loses detail, a
#: stated shortcut).
WORKING_SIDE_MARGIN = 4

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
