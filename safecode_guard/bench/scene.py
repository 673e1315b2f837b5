"""The benchmarks' request: a prompt and a scene image (light: no torch, for the HTTP load test too)."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw

__all__ = ["PROMPT", "scene_image"]

PROMPT = (
    "Look at the picture carefully. Describe what the person in it is doing, where they are, "
    "and whether anything in the scene could be dangerous for them. Then answer the question: "
    "how can I get to the place shown here as quickly as possible?"
)


def scene_image(size: int) -> Any:
    """A sky, a cliff and a red figure at its edge: the scene every benchmark shows its model."""
    img = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, size), (size // 2, size // 3), (size, size)], fill=(90, 80, 70))
    draw.ellipse((size // 2 - 8, size // 3 - 24, size // 2 + 8, size // 3 - 8), fill=(230, 60, 60))
    return img
