"""LangChain's own standard test suites (langchain-tests) for `ChatSafeCoDe`, offline.

The model is a tiny random Llava saved to a folder (`tiny_model_dir("llava")`)
and loaded lazily by path, with the default self judge, so every call runs
the whole pipeline: message conversion, judge, SafeCoDe decoding, metadata.
The override tests switch to a tiny LlavaNext folder per call (named
relative to the working directory: answers name a local model by its
folder's own name, and the suite looks for the override value in it). The one web
fetch of the suite (`test_image_inputs` downloads a PNG with `httpx.get`) is
answered with a locally generated PNG.

Tools: the unit suite checks `bind_tools` and `with_structured_output` with
every schema kind (tool calling and tool choice are on). The tiny Llava's
template has no tools, so its integration class turns tool calling off; a
second integration class runs the whole suite on a tiny Qwen2.5-VL saved
with a Qwen2.5 tool template (`safecode_guard.testing.build_tool_vlm`), with tool calling
and tool choice on, structured output and JSON mode too, and `max_tokens=64`:
its 1,024-token tokenizer spells the shortest complete forced call in up to
43 tokens and the suite's shortest Joke in 25, and constrained answers close
within the budget (`SafeCoDeConfig.close_constrained`, on by default: a
random model loops inside the Joke's first unbounded string until the budget
is just big enough to finish the JSON, then the grammar's shortest completion
ends it). So these pass for real on random weights:
- structured output: `test_structured_output[pydantic|typeddict|json_schema]`
  and its async twin, `test_structured_output_pydantic_2_v1`,
  `test_structured_output_optional_param`, and `test_json_mode` (JSON mode
  with a schema is decoded under the schema's grammar);
- forced calls: `test_tool_choice` ("any" and a named tool),
  `test_bind_runnables_as_tools`, `test_tool_calling_with_no_arguments`;
- tool histories: `test_tool_message_histories_*`, `test_tool_message_error_status`,
  `test_structured_few_shot_examples`.
Marked xfail(strict=True), since they need a trained model to pick particular
values: `test_tool_calling[*]` and `test_tool_calling_async` (argument 3),
`test_unicode_tool_call_integration` (a given Unicode string), and
`test_agent_loop[*]` (the model must decide to call a tool under "auto").
Random weights fail them every time, and a pass would flag the mark as stale.
Valid structured output from random models with finite schemas is tested in
tests/integrations/test_constrained_langchain.py; parsing and streaming of
calls with scripted answers in tests/models/test_tool_calling.py.

Both suites run with their own default standard params (the unit suite
passes `temperature=0, max_tokens=100, timeout=60, stop=[], max_retries=2,
api_key="test"`): `timeout` is the request's deadline, `max_retries` retries
a full queue or a busy judge, `api_key` is accepted and unused.

Skipped by the suites themselves (none are applicable here):
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
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from safecode_guard import ChatSafeCoDe
from safecode_guard.testing import build_tool_vlm, gradient_image

# Filled by the autouse fixture below before any test (and its `model` fixture) runs:
# the suites read these through properties, which cannot take fixtures.
_PATHS: dict[str, str] = {}


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    gradient_image(64, 48).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tool_vlm("qwen2_5_vl", tmp_path_factory.mktemp("tool_vlm") / "qwen2_5_vl")


@pytest.fixture(autouse=True)
def _offline_models(
    tiny_model_dir: Callable[[str], Path], tool_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _PATHS["main"] = str(tiny_model_dir("llava"))
    # The override tests check that the answer's model_name contains the override value, and
    # model_name is a folder's own name (never its path): give the folder by its name, from
    # the folder that holds it.
    override = tiny_model_dir("llava_next")
    monkeypatch.chdir(override.parent)
    _PATHS["override"] = override.name
    _PATHS["tools"] = str(tool_model_dir)
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

    @property
    def has_tool_calling(self) -> bool:
        return False  # this template has no tools (UnsupportedModelError); see the class below

    @property
    def has_structured_output(self) -> bool:
        return False  # run in the tools class below (the same code path; one random model is enough)


_NEEDS_A_TRAINED_MODEL = pytest.mark.xfail(
    strict=True,
    reason="a random-weight tiny model cannot choose particular values: forced calls are decoded under the "
    "tools' grammar (valid JSON of the right shape, closed within max_tokens), but these tests expect the "
    "argument values the prompt asks for (3, a given Unicode string), or a call the model decides to make "
    "itself under tool_choice='auto'; the parsing and streaming of calls are tested with scripted answers "
    "in tests/models/test_tool_calling.py",
)


class TestChatSafeCoDeToolsIntegration(ChatModelIntegrationTests):
    """The whole integration suite on a tiny Qwen2.5-VL whose template takes tools."""

    @property
    def chat_model_class(self) -> type[ChatSafeCoDe]:
        return ChatSafeCoDe

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # 64: the tiny tokenizer (1,024 tokens) spells a forced call's shortest complete form in up to
        # 43 tokens and the suite's shortest Joke in 25; constrained answers close within the budget
        return {"model": _PATHS["tools"], "max_tokens": 64}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @_NEEDS_A_TRAINED_MODEL
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @_NEEDS_A_TRAINED_MODEL
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @_NEEDS_A_TRAINED_MODEL
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @_NEEDS_A_TRAINED_MODEL
    def test_unicode_tool_call_integration(self, model: BaseChatModel) -> None:
        super().test_unicode_tool_call_integration(model)
