"""Shared by the NeMo test modules: the shipped config folders, the offline guard, request helpers."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from nemoguardrails import LLMRails, RailsConfig
from PIL import Image

from safecode_guard import nemo
from support import REPO
from support.image_bytes import data_url

ROOT = REPO
CONFIG_V1 = ROOT / "integrations" / "nemoguardrails" / "safecode"
CONFIG_V2 = ROOT / "integrations" / "nemoguardrails" / "safecode_colang2"
REFUSAL = "I'm sorry, I can't help with that request."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every DNS lookup or connection attempt; the test fails if there was one.

    pytest-socket already blocks sockets, but NeMo's telemetry thread swallows
    the error, so a blocked attempt would pass unnoticed without this.
    """
    attempts: list[str] = []

    def refuse(kind: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{kind}{args[:2]!r}")
            raise OSError(f"test_nemo: no network ({kind})")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    yield attempts
    assert attempts == [], f"network access was attempted: {attempts}"


@pytest.fixture
def safecode_env(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Callable[[str], Path]
) -> Callable[[str], Path]:
    """`use(judge_spec) -> model dir`: SAFECODE_MODEL = the tiny Llava, SAFECODE_JUDGE = the spec."""
    model_dir = tiny_model_dir("llava")
    monkeypatch.setenv("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")
    monkeypatch.setenv(nemo.MODEL_ENV, str(model_dir))
    nemo.clear_caches()

    def use(judge: str) -> Path:
        monkeypatch.setenv(nemo.JUDGE_ENV, judge)
        return model_dir

    yield use
    nemo.clear_caches()


def image_turn(text: str, image: Image.Image) -> dict[str, Any]:
    """An OpenAI-style multimodal user message, as apps send it to NeMo."""
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": data_url(image)}},
        ],
    }


def answer_of(res: Any) -> str:
    return res.response[0]["content"]


def model_answer(rails: LLMRails, message: dict[str, Any]) -> str:
    """What the rails' own main model answers to `message` outside NeMo (same instance, same settings)."""
    chat = rails.llm.raw_llm
    return chat.invoke([HumanMessage(content=message["content"])]).content


MAIN_MODEL_YAML = (
    "models:\n"
    "  - type: main\n"
    "    engine: safecode\n"
    '    model: "${SAFECODE_MODEL}"\n'
    "    parameters:\n"
    '      judge: "${SAFECODE_JUDGE}"\n'
    "      max_new_tokens: 16\n"
)


def write_config(folder: Path, yaml: str, colang: str | None = None) -> Path:
    """A config folder: config.yml, the one-line config.py, and optionally rails.co."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml)
    (folder / "config.py").write_text("from safecode_guard.nemo import init\n")
    if colang is not None:
        (folder / "rails.co").write_text(colang)
    return folder


def load_error(folder: Path) -> BaseException:
    """The error `LLMRails` raises for the config in `folder`, unwrapped from NeMo's config.py wrapper."""
    with pytest.raises(Exception) as info:
        LLMRails(RailsConfig.from_path(str(folder)))
    error = info.value
    if isinstance(error, RuntimeError) and "configuration module" in str(error):
        error = error.__cause__  # NeMo wraps what config.py's init(app) raises
    return error


def hello() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "hello"}]


# A Colang 2.x output rail standing in for any: it blocks answers that hold a listed term.
OUTPUT_RAIL_V2 = '''
flow output rails $output_text
  """Block answers that hold a listed term."""
  $outcome = await CheckBlockedTermsAction(text=$output_text)
  if $outcome.is_blocked
    bot say "I can't share that answer."
    abort
'''

# The same in Colang 1.0 (NeMo's streaming path runs it on each chunk).
OUTPUT_RAIL_V1 = '''
define flow check blocked terms
  $outcome = execute check_blocked_terms
  if $outcome.is_blocked
    bot refuse to share answer
    stop

define bot refuse to share answer
  "I can't share that answer."
'''
