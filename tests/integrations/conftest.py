"""Fixtures of the integrations tier."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 48x40 gradient PNG on disk, for examples and agents that take an image path."""
    from safecode_guard.testing import gradient_image

    path = tmp_path_factory.mktemp("example_images") / "scene.png"
    gradient_image(48, 40).save(path)
    return str(path)
