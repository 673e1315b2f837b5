"""Shared fixtures: tiny random VLMs built offline once per session, and test images.

Session-scoped models are shared by every test: do not mutate them (no
`.to(dtype)`, no weight edits); build your own with `build_tiny_vlm` if you must.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers / nemoguardrails.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keeps save/load bars out of test output
os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
# Tiny models gain nothing from threads, and idle OpenMP threads spin: one thread makes their
# forwards ~50x cheaper when several suites share the cores. Set it before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# uvloop (uvicorn's event loop) keeps the `socket.socket` it finds when first imported; imported
# inside a test, while pytest-socket has swapped in its blocking class, every later server in
# this process would be refused its listening socket. Import it now, before any test runs.
with contextlib.suppress(ImportError):
    import uvloop  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir(family) -> Path` of a saved tiny model, built once per session."""
    from safecode_guard.testing import build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny_vlms")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_vlm(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def load_tiny_vlm(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], tuple[Any, Any]]:
    """Factory: `load_tiny_vlm(family) -> (model, processor)`, loaded with the Auto classes, cached."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded: dict[str, tuple[Any, Any]] = {}

    def get(family: str) -> tuple[Any, Any]:
        if family not in loaded:
            path = tiny_model_dir(family)
            model = AutoModelForImageTextToText.from_pretrained(path).eval()
            loaded[family] = (model, AutoProcessor.from_pretrained(path))
        return loaded[family]

    return get


@pytest.fixture(scope="session")
def tiny_llava(load_tiny_vlm: Callable[[str], tuple[Any, Any]]) -> tuple[Any, Any]:
    """`(model, processor)` of the tiny Llava (CLIP + Llama, ChatML template, 16 image tokens)."""
    return load_tiny_vlm("llava")


@pytest.fixture(scope="session")
def tiny_vlm(tiny_llava: tuple[Any, Any]) -> tuple[Any, Any]:
    """Alias of `tiny_llava`: the tiny VLM a test uses when the family does not matter."""
    return tiny_llava


@pytest.fixture(scope="session")
def test_image() -> Any:
    """A 48x40 RGB gradient (PIL)."""
    from safecode_guard.testing import gradient_image

    return gradient_image(48, 40)


@pytest.fixture(scope="session")
def other_image() -> Any:
    """A 48x40 RGB image of diagonal stripes, clearly unlike `test_image`."""
    from safecode_guard.testing import stripes_image

    return stripes_image(48, 40)


# -- tool calling: shared by the tool-calling, prompting and agent tests ----------------------------------


@pytest.fixture
def chat(load_tiny_vlm, tiny_model_dir):
    """`chat(family="qwen2_5_vl", **fields)`: a ChatSafeCoDe on the shared tiny model with a tool-capable processor."""
    from support.tools import tool_processor

    from safecode_guard import ChatSafeCoDe

    def make(family: str = "qwen2_5_vl", **fields):
        model, _ = load_tiny_vlm(family)
        fields.setdefault("judge", "fixed:safe")
        fields.setdefault("max_new_tokens", 96)
        return ChatSafeCoDe.from_model(model, tool_processor(tiny_model_dir, family), **fields)

    return make


@pytest.fixture
def script(monkeypatch):
    """Scripted token choice for tool tests (everything but `ops.select_token` runs for real)."""
    from support.tools import ScriptedDecoding

    return ScriptedDecoding(monkeypatch)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Any:
    """After every fixture is torn down, lift pytest-socket's per-test guards once more.

    pytest-socket lifts them before fixtures are finalised; a fixture that
    monkeypatched a socket function (the no-network guards of the NeMo and
    loading tests) then restores pytest-socket's guarded version, which would
    leak into every later test (the server tests' loopback clients included).
    """
    yield
    from pytest_socket import _remove_restrictions

    _remove_restrictions()


@pytest.fixture
def decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of every `SafeCoDe.stream` call (the decoder really runs)."""
    from safecode_guard import SafeCoDe

    calls: list[dict[str, Any]] = []
    real = SafeCoDe.stream

    def recording(self: SafeCoDe, messages: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(self, messages, **kwargs)

    monkeypatch.setattr(SafeCoDe, "stream", recording)
    return calls
