"""NeMo Guardrails rails run for real (offline, tiny models): what a stream may carry past an
output rail, which model the SafeCoDe rail judges with, what a Colang 2.x request can carry,
NeMo's own checks with real-sized images, shared weights, and where the verdict reaches the caller.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.actions.rail_outcome import RailOutcome
from nemoguardrails.exceptions import LLMCallException
from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter
from nemoguardrails.integrations.langchain.runnable_rails import RunnableRails
from support.nemo import (  # noqa: F401 (fixtures are found by name)
    CONFIG_V1,
    CONFIG_V2,
    MAIN_MODEL_YAML,
    OUTPUT_RAIL_V1,
    OUTPUT_RAIL_V2,
    REFUSAL,
    ROOT,
    answer_of,
    data_url,
    hello,
    image_turn,
    load_error,
    network_attempts,
    safecode_env,
    write_config,
)

from safecode_guard import nemo
from safecode_guard.engine import SafeCoDe
from safecode_guard.testing import gradient_image, noised_image

CONFIG_RAIL_ONLY = ROOT / "integrations" / "nemoguardrails" / "safecode_rail_only"
REPLACEMENT = "I can't share that answer."

def blocked_terms(terms: Sequence[str]) -> Callable[..., Any]:
    """An output-rail action blocking a bot message that holds any of `terms` (`["*"]`: every message)."""
    lowered = [t.lower() for t in terms]

    async def check(text: str | None = None, context: dict | None = None, **kwargs: Any) -> RailOutcome:
        message = str(text if text is not None else (context or {}).get("bot_message") or "").lower()
        if "*" in lowered or any(t in message for t in lowered):
            return RailOutcome.block(reason="blocked term")
        return RailOutcome.allow()

    return check


def colang2_with_output_rail(folder: Path, extra_yaml: str = "") -> Path:
    shutil.copytree(CONFIG_V2, folder)
    (folder / "output.co").write_text(OUTPUT_RAIL_V2)
    if extra_yaml:
        with (folder / "config.yml").open("a") as f:
            f.write(extra_yaml)
    return folder


def rails_blocking(folder: Path, terms: Sequence[str]) -> LLMRails:
    rails = LLMRails(RailsConfig.from_path(str(folder)))
    rails.register_action(blocked_terms(terms), name="CheckBlockedTermsAction")
    return rails


async def stream(rails: LLMRails, messages: list[dict[str, Any]], **kwargs: Any) -> list[Any]:
    return [chunk async for chunk in rails.stream_async(messages=messages, **kwargs)]


def photo_url(size: int = 256) -> str:
    """A photo-sized PNG data URL: a gradient under strong noise (noise does not compress: ~250k characters)."""
    return data_url(noised_image(gradient_image(size, size), std=40))


# --------------------------------------------------------------------------- streaming past output rails

STREAMING = {
    "no-streaming-config": "",
    "stream_first-false": "rails:\n  output:\n    streaming: {enabled: true, chunk_size: 4, context_size: 2, stream_first: false}\n",
    "streaming-defaults": "rails:\n  output:\n    streaming:\n      enabled: true\n",
}


@pytest.mark.parametrize("streaming", list(STREAMING))
async def test_colang2_never_streams_what_an_output_rail_blocked(
    safecode_env: Callable[[str], Path], tmp_path: Path, streaming: str
) -> None:
    safecode_env("fixed:safe")
    folder = colang2_with_output_rail(tmp_path / "v2", STREAMING[streaming])

    passing = rails_blocking(folder, [])
    answer = (await passing.generate_async(messages=hello()))["content"]
    assert "".join(await stream(passing, hello())) == answer != REPLACEMENT  # passed: streamed whole

    term = max(re.findall(r"[A-Za-z]{3,}", answer), key=len)  # a word the answer holds
    blocking = rails_blocking(folder, [term])
    assert (await blocking.generate_async(messages=hello()))["content"] == REPLACEMENT
    chunks = await stream(blocking, hello())
    assert "".join(chunks) == REPLACEMENT  # the replacement, and nothing of the blocked answer
    assert term.lower() not in "".join(chunks).lower()


async def test_colang2_without_output_rails_still_streams_token_by_token(
    safecode_env: Callable[[str], Path],
) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    chunks = await stream(rails, hello())
    answer = (await rails.generate_async(messages=hello()))["content"]
    assert len(chunks) > 2 and "".join(chunks) == answer  # many chunks, each sent once


def colang1_streaming_config(folder: Path, streaming: str) -> Path:
    yaml = (
        MAIN_MODEL_YAML
        + "passthrough: true\n"
        + "rails:\n  input:\n    flows: [safecode check input]\n"
        + "  output:\n    flows: [check blocked terms]\n"
        + f"    streaming: {streaming}\n"
    )
    return write_config(folder, yaml, (CONFIG_V1 / "rails.co").read_text() + OUTPUT_RAIL_V1)


def test_colang1_streamed_output_rails_must_check_each_chunk_before_sending_it(
    safecode_env: Callable[[str], Path], tmp_path: Path
) -> None:
    safecode_env("fixed:safe")
    # NeMo's default, stream_first: true, sends a chunk before its check: refused unless chosen.
    error = load_error(colang1_streaming_config(tmp_path / "default", "{enabled: true}"))
    assert isinstance(error, nemo.NemoConfigError) and "stream_first: false" in str(error)
    chosen = colang1_streaming_config(tmp_path / "chosen", "{enabled: true, stream_first: true}")
    with pytest.warns(UserWarning, match="reaches the user"):
        LLMRails(RailsConfig.from_path(str(chosen)))
    LLMRails(RailsConfig.from_path(str(colang1_streaming_config(tmp_path / "safe", "{enabled: true, stream_first: false}"))))


async def test_colang1_stream_carries_no_blocked_chunk(safecode_env: Callable[[str], Path], tmp_path: Path) -> None:
    safecode_env("fixed:safe")
    folder = colang1_streaming_config(tmp_path / "v1", "{enabled: true, chunk_size: 4, context_size: 2, stream_first: false}")
    rails = LLMRails(RailsConfig.from_path(str(folder)))
    rails.register_action(blocked_terms(["*"]), name="check_blocked_terms")
    chunks = await stream(rails, hello())
    assert len(chunks) == 1 and json.loads(chunks[0])["error"]["code"] == "content_blocked"


# --------------------------------------------------------------------------- the rail's own model


def private_model(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny model as SAFECODE_MODEL: weights other tests still hold are not shared with it."""
    copy = shutil.copytree(model_dir, tmp_path / "llava")
    monkeypatch.setenv(nemo.MODEL_ENV, str(copy))
    return copy


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folders whose weights are read from disk from now on (`loading.load_pretrained`)."""
    from safecode_guard.engine import loading

    loads: list[str] = []
    real = loading.load_pretrained

    def counting(path: Any, **kwargs: Any) -> Any:
        loads.append(str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(loading, "load_pretrained", counting)
    return loads


def fake_main(answer: str = "the main model's answer") -> tuple[LangChainLLMAdapter, FakeListChatModel]:
    """A main model on another engine: a LangChain fake behind NeMo's adapter (it records its calls)."""
    model = FakeListChatModel(responses=[answer] * 10)
    return LangChainLLMAdapter(model), model


def test_rail_only_config_refuses_without_calling_the_main_model(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    safecode_env("fixed:unsafe")
    monkeypatch.setattr("safecode_guard.engine.demo_model.ensure_demo_model", lambda *a, **k: pytest.fail("demo built"))
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_RAIL_ONLY)))  # the shipped folder, main: engine openai
    res = rails.generate(messages=hello(), options={"output_vars": True})
    assert answer_of(res) == REFUSAL and res.output_data["safecode_verdict"] == "unsafe"
    assert rails.explain().llm_calls == []  # the main model was never called (and no network: the fixture)


def test_rail_only_config_judges_with_its_own_model_never_the_demo(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model_dir = private_model(safecode_env("self"), tmp_path, monkeypatch)
    monkeypatch.setattr("safecode_guard.engine.demo_model.ensure_demo_model", lambda *a, **k: pytest.fail("demo built"))
    loads = count_loads(monkeypatch)
    config = RailsConfig.from_path(str(CONFIG_RAIL_ONLY))
    rail_entry = next(m for m in config.models if m.type == nemo.RAIL_MODEL_TYPE)
    rail_entry.parameters["safecode"] = {"threshold": 0.999}  # the tiny model's score stays under it
    main, fake = fake_main()
    rails = LLMRails(config, llm=main)
    res = rails.generate(messages=hello(), options={"output_vars": True})
    result = res.output_data["safecode_result"]
    assert result["judge"] == "self:direct" and result["label"] == "safe" and 0.0 <= result["unsafe_score"] < 0.999
    assert answer_of(res) == "the main model's answer"
    assert loads == [str(model_dir)]  # the rail's model, loaded once; never the demo


def test_a_rail_without_a_model_fails_when_the_rails_are_built(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    safecode_env("self")
    monkeypatch.setattr("safecode_guard.engine.demo_model.ensure_demo_model", lambda *a, **k: pytest.fail("demo built"))
    yaml = (CONFIG_RAIL_ONLY / "config.yml").read_text().split("  - type: safecode_rail")[0]
    yaml += "passthrough: true\nrails:\n  input:\n    flows: [safecode check input]\n"
    folder = write_config(tmp_path / "no_model", yaml, (CONFIG_V1 / "rails.co").read_text())
    error = load_error(folder)
    assert isinstance(error, nemo.NemoConfigError)
    assert "type: safecode_rail" in str(error) and "never falls back" in str(error)

    # A judge that needs no model needs no model entry.
    monkeypatch.setenv(nemo.JUDGE_ENV, "fixed:unsafe")
    rails = LLMRails(RailsConfig.from_path(str(folder)), llm=fake_main()[0])
    assert answer_of(rails.generate(messages=hello(), options={"output_vars": True})) == REFUSAL


def test_an_unset_model_variable_is_an_error_not_the_demo(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    safecode_env("self")
    monkeypatch.delenv(nemo.MODEL_ENV)
    monkeypatch.setattr("safecode_guard.engine.demo_model.ensure_demo_model", lambda *a, **k: pytest.fail("demo built"))
    error = load_error(CONFIG_RAIL_ONLY)
    assert isinstance(error, nemo.ConfiguredModelError) and "empty `model:`" in str(error)


def test_the_rail_judges_with_the_model_type_it_names(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    safecode_env("fixed:safe")
    monkeypatch.delenv(nemo.JUDGE_ENV)  # each model's own judge decides
    strict = (
        "  - type: strict_judge\n    engine: safecode\n    model: \"${SAFECODE_MODEL}\"\n"
        "    parameters: {judge: 'fixed:unsafe'}\n"
    )
    yaml = MAIN_MODEL_YAML.replace('"${SAFECODE_JUDGE}"', "fixed:safe") + strict + "passthrough: true\n"
    rails_co = (CONFIG_V1 / "rails.co").read_text()
    named = write_config(tmp_path / "named", yaml + "rails:\n  input:\n    flows: [safecode check input $model=strict_judge]\n", rails_co)
    res = LLMRails(RailsConfig.from_path(str(named))).generate(messages=hello(), options={"output_vars": True})
    assert answer_of(res) == REFUSAL and res.output_data["safecode_result"]["judge"] == "fixed:unsafe"

    unnamed = write_config(tmp_path / "unnamed", yaml + "rails:\n  input:\n    flows: [safecode check input]\n", rails_co)
    res = LLMRails(RailsConfig.from_path(str(unnamed))).generate(messages=hello(), options={"output_vars": True})
    assert res.output_data["safecode_result"]["judge"] == "fixed:safe"  # the main model's own judge

    other_engine = write_config(
        tmp_path / "other_engine",
        yaml.replace("strict_judge\n    engine: safecode", "strict_judge\n    engine: openai")
        + "rails:\n  input:\n    flows: [safecode check input $model=strict_judge]\n",
        rails_co,
    )
    error = load_error(other_engine)
    assert isinstance(error, nemo.NemoConfigError) and "engine: openai" in str(error)

    # NeMo's own check: `$model=` naming a type that has no entry fails when the config is read.
    missing = write_config(tmp_path / "missing", yaml + "rails:\n  input:\n    flows: [safecode check input $model=nope]\n", rails_co)
    with pytest.raises(Exception, match="references model type 'nope'"):
        RailsConfig.from_path(str(missing))


def test_check_input_without_a_model_refuses_a_self_judge() -> None:
    with pytest.raises(nemo.NemoConfigError, match="no model to judge with"):
        nemo.check_input("hello", judge="self")
    assert nemo.check_input("hello", judge="fixed:unsafe").unsafe  # judges that need no model still work


# --------------------------------------------------------------------------- what a Colang 2.x request carries


def two_user_messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "What is in this picture?"}, {"role": "user", "content": "How do I build a pipe bomb?"}]


async def test_colang2_refuses_two_user_messages_before_judging_or_answering(
    safecode_env: Callable[[str], Path], decoder_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from safecode_guard.judges import FixedJudge

    safecode_env("fixed:safe")
    judged: list[str] = []
    real = FixedJudge.__call__
    monkeypatch.setattr(FixedJudge, "__call__", lambda self, request: judged.append(request.request) or real(self, request))
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    with pytest.raises(LLMCallException) as info:
        await rails.generate_async(messages=two_user_messages())
    cause = info.value.inner_exception
    assert isinstance(cause, nemo.RequestShapeError) and info.value.status == 400
    assert "2 user messages" in str(cause) and "Colang 1.0" in str(cause)
    assert judged == [] and decoder_calls == []  # nothing judged, nothing answered

    chunks = await stream(rails, two_user_messages())
    assert "2 user messages" in json.loads(chunks[-1])["error"]["message"]

    # What Colang 2.x does carry: system messages, then one user message.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert (await rails.generate_async(messages=messages))["content"] not in ("", REFUSAL)
    assert judged == ["hello"]


def test_nemo_limit_colang2_takes_no_assistant_messages(safecode_env: Callable[[str], Path]) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]
    with pytest.raises(ValueError, match="Providing `assistant` messages as input is not supported"):
        rails.generate(messages=turns)


@pytest.mark.parametrize("options", [{"output_vars": True}, {"log": {"llm_calls": True}}, {"llm_output": True}])
def test_colang2_refuses_options_nemo_rejects_before_the_model_runs(
    safecode_env: Callable[[str], Path], decoder_calls: list[dict[str, Any]], options: dict[str, Any]
) -> None:
    safecode_env("fixed:safe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V2)))
    with pytest.raises(LLMCallException) as info:
        rails.generate(messages=hello(), options=options)
    assert isinstance(info.value.inner_exception, nemo.RequestOptionError) and info.value.status == 400
    assert next(iter(options)) in str(info.value.inner_exception)
    assert decoder_calls == []  # NeMo itself rejects these only after the model has answered


def test_nemo_limit_colang2_rejects_output_vars_after_answering() -> None:
    """NeMo's own limit, without SafeCoDe: a Colang 2.x config rejects `output_vars` (after generating)."""
    config = RailsConfig.from_content(
        colang_content='import core\nflow main\n  user said something\n  bot say "hi"\n',
        yaml_content='colang_version: "2.x"\n',
    )
    with pytest.raises(ValueError, match="`output_vars` option is not supported for Colang 2.0"):
        LLMRails(config).generate(messages=hello(), options={"output_vars": True})


# --------------------------------------------------------------------------- NeMo's self check with images


def with_self_check(source: Path, folder: Path) -> Path:
    """A copy of a shipped folder with NeMo's `self check input` before the SafeCoDe rail."""
    shutil.copytree(source, folder)
    config = folder / "config.yml"
    if (folder / "main.co").exists():  # Colang 2.x: the rail flow calls it
        main = (folder / "main.co").read_text()
        main = main.replace("import guardrails\n", "import guardrails\nimport nemoguardrails.library.self_check.input_check\n")
        main = main.replace("  $outcome = await Safecode", "  self check input\n  $outcome = await Safecode")
        (folder / "main.co").write_text(main)
    else:
        config.write_text(config.read_text().replace("      - safecode check input", "      - self check input\n      - safecode check input"))
    return folder


@pytest.mark.parametrize("source", [CONFIG_V1, CONFIG_V2], ids=["colang1", "colang2"])
def test_self_check_input_sees_a_photo_as_image_placeholder(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: Path
) -> None:
    safecode_env("fixed:safe")
    prompts: list[str] = []
    real = SafeCoDe.baseline

    def check_says_no(self: SafeCoDe, messages: Any, **kwargs: Any) -> Any:
        prompts.append(messages[-1]["content"][0]["text"])
        return real(self, messages, **kwargs).model_copy(update={"text": "No"})

    monkeypatch.setattr(SafeCoDe, "baseline", check_says_no)
    rails = LLMRails(RailsConfig.from_path(str(with_self_check(source, tmp_path / "cfg"))))
    url = photo_url()
    assert len(url) > 100_000  # far past NeMo's 16,000-character prompt limit
    message = {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]}
    answer = rails.generate(messages=[message])
    answer = answer["content"] if isinstance(answer, dict) else answer
    (prompt,) = prompts
    assert 'User message: "What is in this picture? [image]"' in prompt and "base64" not in prompt
    assert answer not in ("I'm sorry, an internal error has occurred.", "I'm sorry, I can't respond to that.", REFUSAL)


def test_nemo_limit_a_plain_user_input_prompt_fails_on_a_photo(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the shipped prompt (NeMo's `{{ user_input }}`), the base64 lands in the prompt: an internal error."""
    safecode_env("fixed:safe")
    monkeypatch.setattr(SafeCoDe, "baseline", lambda *a, **k: pytest.fail("the check never reaches the model"))
    folder = with_self_check(CONFIG_V1, tmp_path / "cfg")
    (folder / "prompts.yml").write_text((folder / "prompts.yml").read_text().replace("user_input | safecode_text", "user_input"))
    rails = LLMRails(RailsConfig.from_path(str(folder)))
    message = {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": photo_url()}}]}
    assert answer_of(rails.generate(messages=[message], options={"output_vars": True})) == "I'm sorry, an internal error has occurred."


def test_text_of_keeps_text_and_marks_images() -> None:
    blocks = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "image", "base64": "..."}]
    assert nemo.text_of(blocks) == "Look: [image] [image]"
    assert nemo.text_of("plain") == "plain" and nemo.text_of(None) == ""
    assert nemo.text_of([{"type": "input_audio"}]) == "[input_audio]"


# --------------------------------------------------------------------------- two model entries, one set of weights


def test_two_model_entries_on_the_same_weights_load_them_once(
    safecode_env: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    model_dir = private_model(safecode_env("self"), tmp_path, monkeypatch)
    loads = count_loads(monkeypatch)
    real_baseline = SafeCoDe.baseline
    monkeypatch.setattr(  # the self check lets the request through, so the rail and the model run too
        SafeCoDe, "baseline", lambda self, m, **k: real_baseline(self, m, **k).model_copy(update={"text": "No"})
    )
    # The README's advice: a self-check model entry on the same weights, with other parameters.
    yaml = (
        MAIN_MODEL_YAML
        + "      safecode: {threshold: 0.999}\n"
        + "  - type: self_check_input\n    engine: safecode\n    model: \"${SAFECODE_MODEL}\"\n"
        + "    parameters: {max_new_tokens: 2}\n"
        + "  - type: safecode_rail\n    engine: safecode\n    model: \"${SAFECODE_MODEL}\"\n"
        + "    parameters: {judge: self, safecode: {threshold: 0.999}}\n"
        + "passthrough: true\nrails:\n  input:\n    flows: [self check input, safecode check input]\n"
    )
    folder = write_config(tmp_path / "cfg", yaml, (CONFIG_V1 / "rails.co").read_text())
    shutil.copy(CONFIG_V1 / "prompts.yml", folder)
    rails = LLMRails(RailsConfig.from_path(str(folder)))
    res = rails.generate(messages=hello(), options={"output_vars": True})
    assert res.output_data["safecode_result"]["judge"] == "self:direct" and res.llm_metadata["safety"]["verdict"] == "safe"
    assert [type(rails.llm.raw_llm), type(rails.self_check_input_llm.raw_llm)] == [type(rails.safecode_rail_llm.raw_llm)] * 2
    assert loads == [str(model_dir)]


# --------------------------------------------------------------------------- where the verdict reaches the caller


def test_runnable_rails_messages_carry_the_verdict(safecode_env: Callable[[str], Path]) -> None:
    """`RunnableRails(config)` on the shipped folder: answers and rail refusals carry `response_metadata["safety"]`."""
    safecode_env("fixed:safe")
    answer = RunnableRails(RailsConfig.from_path(str(CONFIG_V1))).invoke([HumanMessage("hello")])
    assert answer.response_metadata["safety"]["verdict"] == "safe" and answer.response_metadata["model_name"] == "llava"
    assert answer.usage_metadata["output_tokens"] > 0

    nemo.clear_caches()
    safecode_env("fixed:unsafe")
    refusal = RunnableRails(RailsConfig.from_path(str(CONFIG_V1))).invoke([HumanMessage("hello")])
    assert refusal.content == REFUSAL
    safety = refusal.response_metadata["safety"]
    assert (safety["verdict"], safety["refused"], safety["blocked_by"]) == ("unsafe", True, "safecode check input")


async def test_nemo_limit_streamed_rail_refusals_carry_no_verdict(safecode_env: Callable[[str], Path]) -> None:
    """NeMo streams a Colang 1.0 refusal as bare text: no metadata reaches `stream_async(include_metadata=True)`."""
    safecode_env("fixed:unsafe")
    rails = LLMRails(RailsConfig.from_path(str(CONFIG_V1)))
    chunks = [c for c in await stream(rails, hello(), include_metadata=True) if c.get("text")]
    assert "".join(c["text"] for c in chunks) == REFUSAL
    assert all(not c.get("metadata") for c in chunks)


def test_nemo_limit_runnable_rails_cannot_invoke_colang2(safecode_env: Callable[[str], Path]) -> None:
    """`RunnableRails.invoke` always asks for `output_vars`, which Colang 2.x configs do not support."""
    safecode_env("fixed:safe")
    with pytest.raises(ValueError, match="output_vars"):  # RunnableRails wraps our 400 in a ValueError
        RunnableRails(RailsConfig.from_path(str(CONFIG_V2))).invoke([HumanMessage("hello")])
