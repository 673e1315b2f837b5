"""NeMo Guardrails integration: the shipped config folders run for real in `LLMRails`, offline.

Every rails test loads a shipped folder from `integrations/nemoguardrails/`
with a tiny random Llava (`SAFECODE_MODEL`) and a judge from `SAFECODE_JUDGE`.
Tiny models answer gibberish, but their answers depend on the prompt and the
image, so "the image reached the model" is checked by comparing the rails'
answer with the model's own answer to the same image and to another image.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.actions.rail_outcome import RailOutcome
from PIL import Image
from support.nemo import (  # noqa: F401 (fixtures are found by name)
    CONFIG_V1,
    CONFIG_V2,
    MAIN_MODEL_YAML,
    REFUSAL,
    ROOT,
    answer_of,
    data_url,
    hello,
    image_turn,
    load_error,
    model_answer,
    network_attempts,
    safecode_env,
    write_config,
)

from safecode_guard import ChatSafeCoDe, Verdict, nemo
from safecode_guard.engine import SafeCoDe
from safecode_guard.engine.loading import ModelNotFoundError
from safecode_guard.errors import InvalidVerdictError, SafeCoDeError, SafeCoDeInputError
from safecode_guard.judges import JudgeRequest

# --------------------------------------------------------------------------- pure parts


def test_expand_env_follows_shell_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_SET", "/models/llava")
    monkeypatch.setenv("SC_EMPTY", "")
    monkeypatch.delenv("SC_UNSET", raising=False)
    assert nemo.expand_env("${SC_SET}") == "/models/llava"
    assert nemo.expand_env("${SC_SET:-demo}") == "/models/llava"
    assert nemo.expand_env("${SC_EMPTY:-demo}") == "demo"
    assert nemo.expand_env("${SC_UNSET:-fixed:safe}") == "fixed:safe"
    assert nemo.expand_env("a ${SC_UNSET} b") == "a  b"
    assert nemo.expand_env("no $SC_SET braces") == "no $SC_SET braces"


def test_resolve_judge_prefers_argument_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(nemo.JUDGE_ENV, raising=False)
    assert nemo.resolve_judge(None) is None
    monkeypatch.setenv(nemo.JUDGE_ENV, "fixed:unsafe")
    assert nemo.resolve_judge(None) == "fixed:unsafe"
    assert nemo.resolve_judge("fixed:safe") == "fixed:safe"
    assert nemo.resolve_judge("  ") == "fixed:unsafe"


def test_resolve_model_keeps_paths_and_expands_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(nemo.MODEL_ENV, "/models/qwen")
    assert nemo.resolve_model("${SAFECODE_MODEL:-demo}") == "/models/qwen"
    assert nemo.resolve_model("/models/llava") == "/models/llava"


def test_request_messages_puts_the_current_turn_after_earlier_turns() -> None:
    conversation = [
        {"role": "context", "content": {"generation_options": {}}},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "as sent"},
    ]
    current = [{"type": "text", "text": "as the rails see it"}]
    assert nemo.request_messages(current, conversation) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": current},
    ]
    assert nemo.request_messages("hi") == [{"role": "user", "content": "hi"}]
    with pytest.raises(SafeCoDeInputError, match="string or a list"):
        nemo.request_messages(42)


def test_check_input_judges_images_of_earlier_turns(test_image: Image.Image) -> None:
    seen: list[JudgeRequest] = []

    def judge(request: JudgeRequest) -> str:
        seen.append(request)
        return "unsafe" if request.images else "safe"

    conversation = [
        image_turn("Look at this.", test_image),
        {"role": "assistant", "content": "A cliff edge."},
        {"role": "user", "content": "replaced by the current turn"},
    ]
    verdict = nemo.check_input("How do I jump from here?", judge=judge, conversation=conversation)
    assert verdict.label == "unsafe" and verdict.source == "judge"
    assert len(seen[0].images) == 1 and seen[0].images[0].size == test_image.size
    assert seen[0].request == "How do I jump from here?"
    assert nemo.check_input("How do I jump from here?", judge=judge).label == "safe"


def test_check_input_fails_closed_on_unreadable_images() -> None:
    broken = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]
    verdict = nemo.check_input(broken, judge="fixed:safe")
    assert verdict.label == "unsafe" and verdict.source == "fallback"
    assert "ImageInputError" in (verdict.error or "")
    # The default policy never fetches image URLs, so this is refused without a lookup.
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cliff.png"}}]
    verdict = nemo.check_input(remote, judge="fixed:safe")
    assert verdict.source == "fallback" and "allow_image_urls" in (verdict.error or "")


async def test_actions_return_verdict_dict_and_rail_outcome() -> None:
    # Extra keyword arguments are what NeMo's streaming path passes; they must be accepted.
    as_dict = await nemo.safecode_check_input(
        context={"user_message": "hello"}, judge="fixed:unsafe", llm_task_manager=object()
    )
    assert as_dict["label"] == "unsafe" and as_dict["judge"] == "fixed:unsafe"
    assert Verdict.model_validate(as_dict).unsafe

    blocked = await nemo.safecode_check_input_outcome(
        text="hello", judge="fixed:unsafe", model_name="x"
    )
    allowed = await nemo.safecode_check_input_outcome(text="hello", judge="fixed:safe")
    assert isinstance(blocked, RailOutcome) and blocked.is_blocked
    assert blocked.metadata["label"] == "unsafe"
    assert not allowed.is_blocked and allowed.metadata["label"] == "safe"


def test_importing_without_nemoguardrails_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [
        m for m in sys.modules if m == "nemoguardrails" or m.startswith("nemoguardrails.")
    ]:
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import` fail
    monkeypatch.delitem(sys.modules, "safecode_guard.nemo")
    with pytest.raises(ImportError, match=r"pip install 'safecode-guard\[nemo\]'"):
        importlib.import_module("safecode_guard.nemo")


def test_import_loads_no_model_and_no_torch() -> None:
    code = (
        "import sys, safecode_guard.nemo as n; "
        "print(sorted(m for m in ('torch', 'transformers', 'safecode_guard.engine') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "NEMO_GUARDRAILS_NO_USAGE_STATS": "1"},
    )
    assert out.stdout.strip() == "[]"


def test_a_config_without_config_py_gets_the_nemo_error_our_docs_explain(tmp_path: Path) -> None:
    """NeMo's own limit: without config.py none of our code runs, so NeMo's message stands. The
    NeMo README explains that message ("No default base_url for provider 'safecode'"): this pins it."""
    (tmp_path / "config.yml").write_text(MAIN_MODEL_YAML + "passthrough: true\n")
    code = (
        "import sys\n"
        "from nemoguardrails import LLMRails, RailsConfig\n"
        "try:\n"
        "    LLMRails(RailsConfig.from_path(sys.argv[1]))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "NEMO_GUARDRAILS_NO_USAGE_STATS": "1", "SAFECODE_MODEL": "demo"},
    )
    assert "No default base_url for provider 'safecode'" in out.stdout, out.stdout + out.stderr
    readme = (ROOT / "integrations" / "nemoguardrails" / "README.md").read_text()
    assert "No default base_url for provider 'safecode'" in readme


def test_register_provider_refuses_the_langchain_framework(monkeypatch: pytest.MonkeyPatch) -> None:
    import nemoguardrails.llm.frameworks as frameworks

    monkeypatch.setattr(frameworks, "get_default_framework", lambda: "langchain")
    with pytest.raises(SafeCoDeError, match="NEMOGUARDRAILS_LLM_FRAMEWORK") as info:
        nemo.register_provider()
    assert "config.py" in str(info.value)  # what NeMo's advice to set it really points at


# --------------------------------------------------------------------------- Colang 1.0 config, for real


def test_unsafe_verdict_refuses_and_never_calls_the_model(
    safecode_env: Callable[[str], Path],
) -> None:
    safecode_env("fixed:unsafe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    res = rails.generate(
        messages=[{"role": "user", "content": "hello"}], options={"output_vars": True}
    )
    assert answer_of(res) == REFUSAL
    assert res.output_data["safecode_verdict"] == "unsafe"
    assert res.output_data["safecode_result"]["judge"] == "fixed:unsafe"
    assert rails.explain().llm_calls == []
    # No model call: the rail's verdict stands where the model's metadata would (RunnableRails reads it).
    safety = res.llm_metadata["safety"]
    assert (safety["verdict"], safety["refused"], safety["blocked_by"]) == ("unsafe", True, "safecode check input")
    assert res.llm_metadata["response_metadata"]["safety"] == safety


def test_safe_verdict_lets_the_model_answer_with_its_metadata(
    safecode_env: Callable[[str], Path],
) -> None:
    model_dir = safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    message = {"role": "user", "content": "Describe a red chair."}
    res = rails.generate(messages=[message], options={"output_vars": True})
    direct = ChatSafeCoDe(model=str(model_dir), judge="fixed:safe", max_new_tokens=128).invoke(
        [HumanMessage(message["content"])]
    )
    assert answer_of(res) == direct.content != REFUSAL
    assert res.output_data["safecode_verdict"] == "safe"
    safety = res.llm_metadata["safety"]
    assert safety["verdict"] == "safe" and safety["judge"] == "fixed:safe"
    assert safety == direct.response_metadata["safety"]


def test_image_in_a_multimodal_message_reaches_the_model(
    safecode_env: Callable[[str], Path], test_image: Image.Image, other_image: Image.Image
) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    message = image_turn("What is in this picture?", test_image)
    res = rails.generate(messages=[message], options={"output_vars": True})
    assert res.output_data["safecode_verdict"] == "safe"
    assert answer_of(res) == model_answer(rails, message)
    # The answer depends on the image: another image, or none, gives another answer.
    assert answer_of(res) != model_answer(
        rails, image_turn("What is in this picture?", other_image)
    )
    assert answer_of(res) != model_answer(
        rails, {"role": "user", "content": "What is in this picture?"}
    )


def test_config_parameters_reach_the_chat_model(
    safecode_env: Callable[[str], Path], tmp_path: Path
) -> None:
    model_dir = safecode_env("fixed:unsafe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    chat = rails.llm.raw_llm
    assert isinstance(chat, ChatSafeCoDe)
    assert (chat.model, chat.judge, chat.max_new_tokens) == (str(model_dir), "fixed:unsafe", 128)
    # Rails built twice from one config share one chat model (and so one set of weights).
    assert LLMRails(RailsConfig.from_path(str(CONFIG_V1))).llm.raw_llm is chat

    (tmp_path / "config.yml").write_text(
        "models:\n"
        "  - type: main\n"
        "    engine: safecode\n"
        '    model: "${SAFECODE_MODEL}"\n'
        "    parameters:\n"
        '      judge: "${SAFECODE_TEST_UNSET_JUDGE:-fixed:safe}"\n'
        "      max_tokens: 7\n"
        "      safecode: {alpha: 0.5, steered_steps: 3, threshold: 0.7}\n"
        "      policy: {max_images: 2}\n"
        "passthrough: true\n"
    )
    (tmp_path / "config.py").write_text("from safecode_guard.nemo import init\n")
    chat = LLMRails(RailsConfig.from_path(str(tmp_path))).llm.raw_llm
    assert (chat.judge, chat.max_new_tokens) == ("fixed:safe", 7)
    assert (chat.safecode.alpha, chat.safecode.steered_steps, chat.safecode.threshold) == (
        0.5,
        3,
        0.7,
    )
    assert chat.policy.max_images == 2


def test_self_judge_shares_the_main_models_engine(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    from safecode_guard.engine import loading

    # a folder of its own: weights other tests' chat models may still hold are not loaded again
    monkeypatch.setenv(nemo.MODEL_ENV, str(shutil.copytree(safecode_env("self"), tmp_path / "llava")))
    loads: list[str] = []
    real = loading.load_pretrained

    def counting(path: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained", counting)
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    res = rails.generate(
        messages=[{"role": "user", "content": "hello"}], options={"output_vars": True}
    )
    result = res.output_data["safecode_result"]
    assert result["judge"] == "self:direct" and 0.0 <= result["unsafe_score"] <= 1.0
    assert res.output_data["safecode_verdict"] == result["label"]
    rails.generate(messages=[{"role": "user", "content": "hello again"}])
    assert len(loads) == 1  # rail judge and model share one engine, across requests


def test_unreadable_image_is_refused_with_the_reason(safecode_env: Callable[[str], Path]) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    broken = {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAA"}},
        ],
    }
    res = rails.generate(messages=[broken], options={"output_vars": True})
    assert answer_of(res) == REFUSAL
    assert res.output_data["safecode_result"]["source"] == "fallback"
    assert "ImageInputError" in res.output_data["safecode_result"]["error"]


def test_rails_exceptions_replace_the_refusal(safecode_env: Callable[[str], Path]) -> None:
    safecode_env("fixed:unsafe")
    config = RailsConfig.from_path(str(CONFIG_V1))
    config.enable_rails_exceptions = True
    res = LLMRails(config).generate(
        messages=[{"role": "user", "content": "hi"}], options={"output_vars": True}
    )
    assert res.response[0]["role"] == "exception"
    assert res.response[0]["content"]["type"] == "InputRailException"


async def test_streaming_carries_the_safety_metadata(safecode_env: Callable[[str], Path]) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    chunks = [
        c
        async for c in rails.stream_async(
            messages=[{"role": "user", "content": "hi"}], include_metadata=True
        )
    ]
    text = "".join(c["text"] for c in chunks)
    assert text == model_answer(rails, {"role": "user", "content": "hi"})
    assert chunks[0]["metadata"]["provider_metadata"]["safety"]["judge"] == "fixed:safe"


# --------------------------------------------------------------------------- Colang 2.x config


def test_colang2_config_refuses_and_answers_with_images(
    safecode_env: Callable[[str], Path], test_image: Image.Image
) -> None:
    safecode_env("fixed:unsafe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    assert rails.generate(messages=[{"role": "user", "content": "hi"}])["content"] == REFUSAL

    nemo.clear_caches()
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    message = image_turn("What is in this picture?", test_image)
    answer = rails.generate(messages=[message])["content"]
    assert answer == model_answer(rails, message) != REFUSAL


def test_colang2_hands_the_rails_verdict_to_the_model(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    safecode_env("self")
    judged: list[int] = []
    real = SafeCoDe.next_token_logits

    def counting(self: SafeCoDe, messages: Any) -> Any:
        judged.append(1)
        return real(self, messages)

    monkeypatch.setattr(SafeCoDe, "next_token_logits", counting)
    config = RailsConfig.from_path(str(CONFIG_V2))
    # A threshold the tiny model's score stays under, so the request is answered, not refused.
    config.models[0].parameters["safecode"] = {"threshold": 0.999}
    rails = LLMRails(config)
    answer = rails.generate(messages=[{"role": "user", "content": "hello"}])["content"]
    assert answer != REFUSAL
    assert len(judged) == 1  # by the rail only; the model steered with the rail's verdict


# --------------------------------------------------------------------------- the example: RunnableRails, streaming


@pytest.fixture
def example(safecode_env: Callable[[str], Path]) -> Any:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        module = importlib.import_module("nemo_runnable_rails")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def test_runnable_rails_chain_guards_chatsafecode(
    example: Any, safecode_env: Callable[[str], Path], test_image: Image.Image
) -> None:
    safecode_env("fixed:safe")
    chat = example.make_chat(max_new_tokens=12)
    url = data_url(test_image)
    out = example.guarded_chain(chat).invoke({"question": "What is here?", "image_url": url})
    direct = chat.invoke([HumanMessage(content=image_turn("What is here?", test_image)["content"])])
    assert out.content == direct.content != REFUSAL
    assert direct.response_metadata["safety"]["verdict"] == "safe"
    assert out.response_metadata == {}  # RunnableRails drops it (README, "Where the verdict...")
    # ... but its streamed chunks carry it, as their extra `provider_metadata` attribute
    text, safety = example.stream_guarded(chat, "What is here?", url)
    assert text == direct.content
    assert safety == direct.response_metadata["safety"]

    nemo.clear_caches()
    safecode_env("fixed:unsafe")
    out = example.guarded_chain(chat).invoke({"question": "What is here?", "image_url": url})
    assert out.content == REFUSAL
    assert example.stream_guarded(chat, "What is here?", url) == (REFUSAL, None)  # the model never ran

    # NeMo 0.24 limit: RunnableRails cannot stream as a step after a prompt.
    with pytest.raises((TypeError, ValueError)):
        list(example.guarded_chain(chat).stream({"question": "What is here?", "image_url": url}))


async def test_streamed_output_rail_never_leaks_blocked_text(
    example: Any, safecode_env: Callable[[str], Path]
) -> None:
    safecode_env("fixed:safe")
    chat = example.make_chat(max_new_tokens=40)
    messages = [{"role": "user", "content": "Tell me about the red chair."}]
    full = chat.invoke([HumanMessage(messages[0]["content"])]).content
    streamed = "".join(await example.stream_answer(example.streaming_rails(chat, []), messages))
    assert streamed == full

    # A word from the second half of the answer: earlier chunks may stream, the blocked one must not.
    words = re.findall(r"[A-Za-z]{3,}", full[len(full) // 2 :])
    assert words, full
    term = max(words, key=len)
    chunks = await example.stream_answer(example.streaming_rails(chat, [term]), messages)
    error = json.loads(chunks[-1])["error"]
    assert error["code"] == "content_blocked"
    assert term.lower() not in "".join(chunks[:-1]).lower()

    # Control: NeMo's default, stream_first: true, sends the blocked chunk before the block.
    leaky = example.streaming_rails(chat, [term])
    leaky.config.rails.output.streaming.stream_first = True
    chunks = await example.stream_answer(leaky, messages)
    assert json.loads(chunks[-1])["error"]["code"] == "content_blocked"
    assert term.lower() in "".join(chunks[:-1]).lower()


def test_generate_action_takes_only_real_verdicts(tiny_llava: tuple[Any, Any]) -> None:
    chat = ChatSafeCoDe.from_model(*tiny_llava, judge="fixed:safe")
    rail = Verdict(label="unsafe", unsafe_score=0.9, judge="self:direct").to_dict()
    assert nemo.actions._verdict_option(chat, rail)["verdict"].unsafe_score == 0.9
    assert nemo.actions._verdict_option(chat, "safe")["verdict"].label == "safe"
    assert nemo.actions._verdict_option(chat, None) == {}
    assert nemo.actions._verdict_option(object(), rail) == {}  # other models take no `verdict` option
    with pytest.raises(SafeCoDeInputError, match="not a verdict"):
        nemo.actions._verdict_option(chat, 42)
    # a tampered record is refused, typed, never read as a verdict
    for tampered in ({"label": "maybe"}, {**rail, "label": "UNSAFE"}, {**rail, "unsafe_score": float("nan")},
                     Verdict.model_construct(label="UNSAFE", judge="x", source="judge")):
        with pytest.raises(InvalidVerdictError):
            nemo.actions._verdict_option(chat, tampered)


def test_colang1_judges_each_request_once_the_model_reuses_the_rails_verdict(
    safecode_env: Callable[[str], Path], test_image: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safecode_guard.judges import FixedJudge

    calls: list[str] = []
    real_call = FixedJudge.__call__

    def counting(self: FixedJudge, request: Any) -> Any:
        calls.append(request.request)
        return real_call(self, request)

    monkeypatch.setattr(FixedJudge, "__call__", counting)
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    res = rails.generate(messages=[image_turn("What is in this picture?", test_image)], options={"output_vars": True})
    assert res.output_data["safecode_verdict"] == "safe"
    assert res.llm_metadata["safety"]["source"] == "judge"  # the rail's own judgement, not an override
    assert calls == ["What is in this picture?"]  # the rail judged; the model reused it
    # outside a rail nothing is handed off: the model judges by itself
    rails.llm.raw_llm.invoke([HumanMessage(content=image_turn("What is in this picture?", test_image)["content"])])
    assert len(calls) == 2


# --------------------------------------------------------------------------- config checks at load

def test_a_parameter_typo_fails_when_the_rails_are_built(
    safecode_env: Callable[[str], Path], tmp_path: Path
) -> None:
    safecode_env("fixed:safe")
    folder = write_config(tmp_path, MAIN_MODEL_YAML + "      judgee: fixed:unsafe\npassthrough: true\n")
    error = load_error(folder)
    # A ModelInitializationError (so NeMo's server shows its text), caused by the typed input error.
    assert isinstance(error, nemo.ConfiguredModelError) and isinstance(error.__cause__, SafeCoDeInputError)
    assert re.search(r"judgee.*[Dd]id you mean .judge.", str(error)), error


def test_a_wrong_model_fails_when_the_rails_are_built(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    safecode_env("self")
    monkeypatch.setenv(nemo.MODEL_ENV, str(tmp_path / "lava"))
    error = load_error(CONFIG_V1)
    assert isinstance(error, nemo.ConfiguredModelError) and "'lava' was not found" in str(error)
    assert str(tmp_path) not in str(error)  # NeMo's server shows this text to clients
    assert isinstance(error.__cause__, ModelNotFoundError) and "folder not found" in str(error.__cause__)


def test_colang1_with_safecode_needs_passthrough(safecode_env: Callable[[str], Path], tmp_path: Path) -> None:
    safecode_env("fixed:safe")
    error = load_error(write_config(tmp_path / "unset", MAIN_MODEL_YAML))
    assert isinstance(error, nemo.NemoConfigError) and "passthrough: true" in str(error)

    folder = write_config(tmp_path / "off", MAIN_MODEL_YAML + "passthrough: false\n")
    with pytest.warns(UserWarning, match="images do not reach it"):
        LLMRails(RailsConfig.from_path(str(folder)))


def test_an_engine_typo_is_named(safecode_env: Callable[[str], Path], tmp_path: Path) -> None:
    safecode_env("fixed:safe")
    folder = write_config(tmp_path, MAIN_MODEL_YAML.replace("engine: safecode", "engine: safecod") + "passthrough: true\n")
    error = load_error(folder)
    assert isinstance(error, nemo.NemoConfigError)
    assert "`engine: safecod`" in str(error) and "Did you mean `engine: safecode`?" in str(error)


# --------------------------------------------------------------------------- what requests may set


@pytest.mark.parametrize("config_dir", [CONFIG_V1, CONFIG_V2], ids=["colang1", "colang2"])
@pytest.mark.parametrize("option", [{"verdict": "safe"}, {"verdict": {"label": "safe"}}, {"model": "/etc"}])
def test_requests_cannot_set_the_verdict_or_the_model(
    safecode_env: Callable[[str], Path], config_dir: Path, option: dict[str, Any]
) -> None:
    from nemoguardrails.exceptions import LLMCallException

    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(config_dir)))
    with pytest.raises(LLMCallException) as info:
        rails.generate(messages=hello(), options={"llm_params": option})
    cause = info.value.inner_exception
    assert isinstance(cause, nemo.RequestOptionError) and cause.status_code == 400
    assert repr(next(iter(option))) in str(cause)


def test_library_callers_may_opt_in_to_verdict_overrides(
    safecode_env: Callable[[str], Path], tiny_llava: tuple[Any, Any]
) -> None:
    safecode_env("fixed:safe")
    chat = ChatSafeCoDe.from_model(*tiny_llava, judge="fixed:safe", max_new_tokens=8)
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)), llm=nemo.SafeCoDeLLMAdapter(chat, allow_verdict=True))
    res = rails.generate(messages=hello(), options={"llm_params": {"verdict": "unsafe"}})
    assert res.llm_metadata["safety"]["source"] == "override"
    assert res.llm_metadata["safety"]["verdict"] == "unsafe"


@pytest.mark.parametrize("config_dir", [CONFIG_V1, CONFIG_V2], ids=["colang1", "colang2"])
def test_openai_options_from_requests_reach_the_decoder(
    safecode_env: Callable[[str], Path], decoder_calls: list[dict[str, Any]], config_dir: Path
) -> None:
    safecode_env("fixed:safe")
    calls = decoder_calls
    rails = LLMRails(RailsConfig.from_path(str(config_dir)))
    params = {
        "max_completion_tokens": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"7": -100},
        "temperature": 0.7,
        "top_k": 5,
        "seed": 4,
    }
    rails.generate(messages=hello(), options={"llm_params": params})
    (used,) = calls
    assert used["max_new_tokens"] == 3
    assert (used["presence_penalty"], used["frequency_penalty"], used["logit_bias"]) == (0.5, -0.5, {"7": -100})
    assert (used["temperature"], used["top_k"], used["seed"], used["do_sample"]) == (0.7, 5, 4, True)


def test_the_served_name_not_the_path_shows_in_nemo_logs(safecode_env: Callable[[str], Path]) -> None:
    model_dir = safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    res = rails.generate(messages=hello(), options={"log": {"llm_calls": True}})
    (call,) = res.log.llm_calls
    assert (call.llm_model_name, call.llm_provider_name) == ("llava", "safecode")
    assert str(model_dir) not in res.model_dump_json()


# --------------------------------------------------------------------------- NeMo's own checks with SafeCoDe as main model

SELF_CHECK_YAML = (
    MAIN_MODEL_YAML
    + "passthrough: true\n"
    + "rails:\n  input:\n    flows: [self check input]\n"
    + "prompts:\n"
    + "  - task: self_check_input\n"
    + '    content: "Should this message be blocked? {{ user_input }} Answer Yes or No."\n'
)


def test_nemo_checks_decode_plainly_within_the_token_limit(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from safecode_guard.judges import FixedJudge

    safecode_env("fixed:safe")
    judged: list[str] = []
    real_judge = FixedJudge.__call__

    def counting(self: FixedJudge, request: Any) -> Any:
        judged.append(request.request)
        return real_judge(self, request)

    plain: list[dict[str, Any]] = []
    check_answer = ["No"]  # what the (gibberish-speaking) tiny model is made to answer the check
    real_baseline = SafeCoDe.baseline

    def recording(self: SafeCoDe, messages: Any, **kwargs: Any) -> Any:
        plain.append({"prompt": messages[-1]["content"][0]["text"], **kwargs})
        return real_baseline(self, messages, **kwargs).model_copy(update={"text": check_answer[-1]})

    monkeypatch.setattr(FixedJudge, "__call__", counting)
    monkeypatch.setattr(SafeCoDe, "baseline", recording)
    rails = LLMRails(RailsConfig.from_path(str(write_config(tmp_path, SELF_CHECK_YAML))))
    res = rails.generate(messages=hello(), options={"output_vars": True})
    (check,) = plain
    assert check["prompt"].startswith("Should this message be blocked? hello")
    assert check["max_new_tokens"] == 16  # the config's limit, not the check's max_tokens: 1024
    assert judged == ["hello"]  # the answer was judged; the check's prompt was not
    assert res.llm_metadata["safety"]["judge"] == "fixed:safe"

    check_answer.append("Yes")  # the check blocks: the model never answers
    res = rails.generate(messages=hello(), options={"output_vars": True})
    assert answer_of(res) == "I'm sorry, I can't respond to that."  # NeMo's own refusal
    assert res.llm_metadata is None  # not the check call's metadata
    assert judged == ["hello"]  # nothing judged this time: the model never ran


# --------------------------------------------------------------------------- Colang 2.x streaming


@pytest.mark.parametrize("judge", ["fixed:safe", "fixed:unsafe"])
async def test_colang2_streams_the_answer_and_the_refusal(
    safecode_env: Callable[[str], Path], judge: str
) -> None:
    safecode_env(judge)
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    streamed = "".join([c async for c in rails.stream_async(messages=hello())])
    answer = (await rails.generate_async(messages=hello()))["content"]
    assert streamed == answer != ""
    assert (answer == REFUSAL) == (judge == "fixed:unsafe")


# --------------------------------------------------------------------------- NeMo 0.24 limits (pinned: a change here means README's list is out of date)


async def test_nemo_limit_rails_exceptions_do_not_stream(safecode_env: Callable[[str], Path]) -> None:
    safecode_env("fixed:unsafe")
    for folder in (CONFIG_V1, CONFIG_V2):
        config = RailsConfig.from_path(str(folder))
        config.enable_rails_exceptions = True
        chunks = [c async for c in LLMRails(config).stream_async(messages=hello())]
        assert chunks == []  # generate() returns the InputRailException; the stream says nothing


def test_a_model_that_fails_to_load_on_a_request_is_reported_without_its_path(
    safecode_env: Callable[[str], Path], tmp_path: Path
) -> None:
    import shutil

    from nemoguardrails.exceptions import LLMCallException

    model_dir = safecode_env("fixed:safe")
    broken = tmp_path / "secret-place" / "llava"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").unlink()  # passes the source check; the weights are missing
    adapter = nemo.SafeCoDeLLMAdapter(ChatSafeCoDe(model=str(broken), judge="fixed:safe"))
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)), llm=adapter)
    with pytest.raises(LLMCallException) as info:
        rails.generate(messages=hello())
    message = str(info.value.inner_exception)
    assert message == "The model 'llava' could not be loaded; the server log has the reason."
    assert "secret-place" not in str(info.value)


def test_the_rails_judge_sees_tool_calls_and_tool_results() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Look it up."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "search", "arguments": '{"q": "x"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Step 1: acquire the detonator."},
        {"role": "user", "content": "Continue."},
    ]
    messages = nemo.request_messages("Continue.", conversation)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    request = nemo.judging._check("Continue.", llm=None, judge="fixed:safe", conversation=conversation)[1]
    texts = [p.get("text", "") for m in request.conversation for p in m["content"] if isinstance(p, dict)]
    assert "Step 1: acquire the detonator." in texts
    assert any(m.get("tool_calls") for m in request.conversation)
