"""LangChain's own standard test suites (langchain-tests) for `ChatSafeCoDe`, offline.

The model is a tiny random Llava saved to a folder (`tiny_model_dir("llava")`)
and loaded lazily by path, with the default self judge, so every call runs
the whole pipeline: message conversion, judge, SafeCoDe decoding, metadata.
The override tests switch to a tiny LlavaNext folder per call. No test is
overridden; the one web fetch of the suite (`test_image_inputs` downloads a
PNG with `httpx.get`) is answered with a locally generated PNG.

Skipped by the suites themselves (none are applicable here):
- tool calling, tool choice, tool messages, agent loop, structured output,
  JSON mode: ChatSafeCoDe does not offer tools or structured output (yet);
- PDF, audio, video and Anthropic-format inputs: text and images only;
- image URLs: off by default (`InputPolicy.allow_image_urls`);
- `test_serdes`: not LangChain-serialisable (it may hold loaded weights);
- `test_init_from_env`: nothing is read from the environment;
- `test_stream_time`: needs recorded VCR cassettes of a remote API.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from safecode_guard import ChatSafeCoDe
from safecode_guard.testing import gradient_image

# Filled by the autouse fixture below before any test (and its `model` fixture) runs:
# the suites read these through properties, which cannot take fixtures.
_PATHS: dict[str, str] = {}


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    gradient_image(64, 48).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _offline_models(tiny_model_dir: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _PATHS["main"] = str(tiny_model_dir("llava"))
    _PATHS["override"] = str(tiny_model_dir("llava_next"))
    png = _png_bytes()

    def fake_get(url: str, **kwargs: Any) -> httpx.Response:
        assert url.endswith(".png"), f"unexpected download in a standard test: {url}"
        return httpx.Response(200, content=png, request=httpx.Request("GET", url))

    monkeypatch.setattr("langchain_tests.integration_tests.chat_models.httpx.get", fake_get)


class TestChatSafeCoDeUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatSafeCoDe]:
        return ChatSafeCoDe

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": _PATHS["main"]}

    @property
    def supports_image_inputs(self) -> bool:
        return True


class TestChatSafeCoDeIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatSafeCoDe]:
        return ChatSafeCoDe

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": _PATHS["main"], "max_tokens": 32}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        return _PATHS["override"]
