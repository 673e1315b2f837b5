"""Chat messages in the Hugging Face format the engine reads, built the same way by every test."""

from __future__ import annotations

from typing import Any


def user_turn(text: str, *images: Any) -> list[dict[str, Any]]:
    """One user turn: the images first, then the text."""
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images), {"type": "text", "text": text}]}]
