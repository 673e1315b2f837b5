"""Fixtures of the model tier: tiny models of their own, for tests that change a scheduler's settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def fresh(tiny_model_dir: Callable[[str], Path]) -> Callable[..., tuple[Any, Any]]:
    """`fresh(family="llava") -> (model, processor)`: a model object of its own, so its engines get a scheduler with their own settings."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    def load(family: str = "llava") -> tuple[Any, Any]:
        path = tiny_model_dir(family)
        return AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)

    return load


@pytest.fixture(scope="module")
def loaded(fresh: Callable[..., tuple[Any, Any]]) -> Callable[[str], tuple[Any, Any]]:
    """`loaded(family) -> (model, processor)`: like `fresh`, but one model per family for the whole module."""
    cache: dict[str, tuple[Any, Any]] = {}

    def get(family: str) -> tuple[Any, Any]:
        if family not in cache:
            cache[family] = fresh(family)
        return cache[family]

    return get



@pytest.fixture(scope="module")
def tool_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Any, Any]]:
    """`tool_models[family] -> (model, processor)` saved with a tool-capable chat template, built on
    first use (one model object per family and module)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from safecode_guard.testing import build_tool_vlm

    class Built(dict[str, tuple[Any, Any]]):
        def __missing__(self, family: str) -> tuple[Any, Any]:
            path = build_tool_vlm(family, tmp_path_factory.mktemp("tool_models") / family)
            self[family] = (AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path))
            return self[family]

    return Built()
