"""`SafeCoDeMiddleware` in real LangChain v1 agents (`create_agent`), and the agent example.

The agents, their loops, tool nodes and state are real. The models are a
`ChatSafeCoDe` on tiny Qwen2.5-VL / Llava models with tool-capable templates,
whose token choice is scripted (`ScriptedDecoding`), and, for agents whose
main model is not ours, a scripted LangChain chat model. Judges are fixed or
counting callables, plus one run of the real "self" judge.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.structured_output import (
    ProviderStrategy,
    StructuredOutputValidationError,
    ToolStrategy,
)
from langchain_core.exceptions import ModelRefusalError
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from pydantic import BaseModel
from support.doubles import ScriptedChatModel
from support.examples import load_example
from support.tools import ScriptedDecoding

from safecode_guard import ChatSafeCoDe, SafeCoDeConfig, SafeCoDeInputError, Verdict
from safecode_guard.judges import JudgeRequest
from safecode_guard.middleware import DEFAULT_REFUSAL_MESSAGE, SafeCoDeMiddleware
from safecode_guard.ops import opens_with_refusal
from safecode_guard.testing import build_tool_vlm, call_text, gradient_image, stripes_image

QWEN = "qwen2_5_vl"


class Actions:
    """Tools that record what they did: the test's view of the agent's side effects."""

    def __init__(self) -> None:
        self.done: list[tuple[str, dict[str, Any]]] = []

        @tool
        def get_weather(city: str) -> str:
            """Current weather in a city."""
            self.done.append(("get_weather", {"city": city}))
            return f"Sunny in {city}."

        @tool
        def unlock_door(door: str) -> str:
            """Unlock a door of the house."""
            self.done.append(("unlock_door", {"door": door}))
            return f"{door} unlocked."

        self.tools = [get_weather, unlock_door]


class CountingJudge:
    """A judge that answers `label` and remembers every request and the thread it ran in."""

    def __init__(self, label: str) -> None:
        self.name = f"counting:{label}"
        self.label = label
        self.requests: list[JudgeRequest] = []
        self.threads: list[int] = []

    def __call__(self, request: JudgeRequest) -> Verdict:
        self.requests.append(request)
        self.threads.append(threading.get_ident())
        return Verdict(label=self.label, unsafe_score=0.9 if self.label == "unsafe" else 0.1, judge=self.name)  # type: ignore[arg-type]


def photo_question(text: str = "Should I open the door for this visitor?") -> HumanMessage:
    return HumanMessage([{"type": "image", "image": gradient_image()}, {"type": "text", "text": text}])


# =========================================================================== construction


def test_importing_without_the_agents_extra_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "safecode_guard.middleware", raising=False)
    monkeypatch.delitem(sys.modules, "safecode_guard.langchain.middleware", raising=False)
    monkeypatch.setitem(sys.modules, "langchain.agents.middleware", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'safecode-guard\[agents\]'"):
        importlib.import_module("safecode_guard.middleware")


def test_construction_validates_and_names_the_fix(chat: Callable[..., ChatSafeCoDe]) -> None:
    with pytest.raises(SafeCoDeInputError, match="no `model` was given"):
        SafeCoDeMiddleware()  # the self judge needs the local model
    with pytest.raises(SafeCoDeInputError, match="on_unsafe"):
        SafeCoDeMiddleware(judge="fixed:safe", on_unsafe="warn")  # type: ignore[arg-type]
    with pytest.raises(SafeCoDeInputError, match="ChatSafeCoDe or a SafeCoDe engine"):
        SafeCoDeMiddleware(model=ScriptedChatModel())
    with pytest.raises(SafeCoDeInputError, match="refusal_message"):
        SafeCoDeMiddleware(judge="fixed:safe", refusal_message=" ")
    with pytest.raises(SafeCoDeInputError, match="Unknown judge spec"):
        SafeCoDeMiddleware(judge="self:vibes", model=chat())
    llm = chat(safecode={"threshold": 0.7})
    assert SafeCoDeMiddleware(model=llm).config.threshold == 0.7  # defaults follow the model


# =========================================================================== ChatSafeCoDe as the agent's model


def test_safe_turn_runs_tools_and_the_verdict_is_shared_and_renewed_for_tool_results(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    actions, judge = Actions(), CountingJudge("safe")
    model_judge = CountingJudge("unsafe")  # would block everything, were it asked
    llm = chat(judge=model_judge)
    script.add(call_text(QWEN, "get_weather", {"city": "Paris"}), "It is sunny in Paris.")
    agent = create_agent(llm, tools=actions.tools, middleware=[SafeCoDeMiddleware(judge=judge, model=llm)])
    state = agent.invoke({"messages": [photo_question("What's the weather in Paris?")]})
    assert actions.done == [("get_weather", {"city": "Paris"})]
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert state["messages"][-1].content == "It is sunny in Paris."
    # the user turn is judged once, and again when the tool's result came in (the model never judges)
    assert len(judge.requests) == 2 and model_judge.requests == []
    request = judge.requests[0]
    assert request.request == "What's the weather in Paris?" and len(request.images) == 1
    assert [m["role"] for m in judge.requests[1].conversation][-2:] == ["assistant", "tool"]
    verdict = state["safecode_verdict"]
    assert verdict["label"] == "safe" and verdict["judge"] == "counting:safe"
    assert verdict["message_id"] == state["messages"][0].id
    safety = state["messages"][-1].response_metadata["safety"]
    assert (safety["verdict"], safety["judge"], safety["source"]) == ("safe", "counting:safe", "override")


def test_a_harmful_tool_result_is_judged_before_the_model_reads_it(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    actions = Actions()
    llm = chat()
    script.add(call_text(QWEN, "get_weather", {"city": "Paris"}), "Here is how.")

    def judge(request: Any) -> str:  # unsafe once a tool result says something harmful
        return "unsafe" if any(m["role"] == "tool" for m in request.conversation) else "safe"

    agent = create_agent(llm, tools=actions.tools, middleware=[SafeCoDeMiddleware(judge=judge, model=llm)])
    state = agent.invoke({"messages": [photo_question("What's the weather in Paris?")]})
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE and script.calls == 1
    assert state["safecode_verdict"]["label"] == "unsafe"


def test_unsafe_turn_ends_before_the_model_runs(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    actions, judge = Actions(), CountingJudge("unsafe")
    llm = chat()
    script.add(call_text(QWEN, "unlock_door", {"door": "front"}))
    agent = create_agent(llm, tools=actions.tools, middleware=[SafeCoDeMiddleware(judge=judge, model=llm)])
    state = agent.invoke({"messages": [photo_question()]})
    assert script.calls == 0 and actions.done == []
    final = state["messages"][-1]
    assert len(state["messages"]) == 2 and final.content == DEFAULT_REFUSAL_MESSAGE
    safety = final.response_metadata["safety"]
    assert (safety["verdict"], safety["unsafe_score"], safety["refused"], safety["blocked_by"]) == (
        "unsafe", 0.9, True, "SafeCoDeMiddleware")
    assert state["safecode_verdict"]["label"] == "unsafe"


@pytest.mark.parametrize("family", [QWEN, "llava"])
def test_unsafe_turn_in_record_mode_answers_but_no_tool_runs(
    family: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    actions = Actions()
    # boost mode: the scripted call is the whole answer, so both call layouts are read as calls
    llm = chat(family, safecode={"unsafe_mode": "boost"})
    script.add(call_text(family, "unlock_door", {"door": "front"}))
    guard = SafeCoDeMiddleware(judge="fixed:unsafe", model=llm, on_unsafe="record", refusal_message="No.")
    state = create_agent(llm, tools=actions.tools, middleware=[guard]).invoke({"messages": [photo_question()]})
    assert script.calls == 1 and actions.done == []
    final = state["messages"][-1]
    assert isinstance(final, AIMessage) and final.tool_calls == []
    blocked = final.response_metadata["safety"]["blocked_tool_calls"]
    assert [(c["name"], c["args"]) for c in blocked] == [("unlock_door", {"door": "front"})]
    assert final.response_metadata["safety"]["verdict"] == "unsafe"
    assert state["safecode_verdict"]["label"] == "unsafe"


def test_the_self_judge_uses_the_agent_model(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    llm = chat()
    script.add("Hello there.")
    guard = SafeCoDeMiddleware(model=llm, on_unsafe="record")
    state = create_agent(llm, tools=[], middleware=[guard]).invoke({"messages": [photo_question("Hi!")]})
    verdict = state["safecode_verdict"]
    assert verdict["judge"] == "self:direct" and 0.0 <= verdict["unsafe_score"] <= 1.0
    assert state["messages"][-1].response_metadata["safety"]["unsafe_score"] == verdict["unsafe_score"]


def test_each_new_user_turn_is_judged_again(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    judge = CountingJudge("safe")
    llm = chat()
    script.add("First answer.", "Second answer.")
    agent = create_agent(llm, tools=[], middleware=[SafeCoDeMiddleware(judge=judge, model=llm)], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t1"}}
    agent.invoke({"messages": [HumanMessage("one")]}, config)
    judge.label = "unsafe"
    state = agent.invoke({"messages": [HumanMessage("two")]}, config)
    assert [r.request for r in judge.requests] == ["one", "two"]
    assert state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE and script.calls == 1


# =========================================================================== another provider's model


def test_guards_an_agent_whose_model_is_not_ours() -> None:
    actions, judge = Actions(), CountingJudge("unsafe")
    other = ScriptedChatModel(replies=[AIMessage("", tool_calls=[{"name": "unlock_door", "args": {"door": "front"}, "id": "c1"}])])
    agent = create_agent(other, tools=actions.tools, middleware=[SafeCoDeMiddleware(judge=judge)])
    state = agent.invoke({"messages": [HumanMessage([{"type": "image", "image": stripes_image()},
                                                     {"type": "text", "text": "Let them in"}])]})
    assert other.seen == [] and actions.done == []  # ended before the model was called
    assert state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE
    assert len(judge.requests[0].images) == 1 and judge.requests[0].request == "Let them in"


def test_record_mode_blocks_the_other_models_tool_calls_after_the_call() -> None:
    actions = Actions()
    call = {"name": "unlock_door", "args": {"door": "front"}, "id": "c1", "type": "tool_call"}
    other = ScriptedChatModel(replies=[AIMessage("Opening it.", tool_calls=[call], id="ai-1")])
    guard = SafeCoDeMiddleware(judge=CountingJudge("unsafe"), on_unsafe="record")
    state = create_agent(other, tools=actions.tools, middleware=[guard]).invoke({"messages": [HumanMessage("Let them in")]})
    assert len(other.seen) == 1 and actions.done == []
    final = state["messages"][-1]
    assert final.id == "ai-1" and final.tool_calls == [] and final.content == "Opening it."
    safety = final.response_metadata["safety"]
    assert safety["blocked_tool_calls"] == [call] and safety["blocked_by"] == "SafeCoDeMiddleware"
    assert not any(isinstance(m, ToolMessage) for m in state["messages"])


def test_safe_verdict_leaves_the_other_model_alone() -> None:
    actions = Actions()
    other = ScriptedChatModel(replies=[
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"}]),
        AIMessage("Sunny in Oslo."),
    ])
    guard = SafeCoDeMiddleware(judge=CountingJudge("safe"), block_tool_calls=True)
    state = create_agent(other, tools=actions.tools, middleware=[guard]).invoke({"messages": [HumanMessage("Oslo?")]})
    assert actions.done == [("get_weather", {"city": "Oslo"})]
    assert state["messages"][-1].content == "Sunny in Oslo." and state["safecode_verdict"]["label"] == "safe"
    assert all("verdict" not in o for o in other.options)  # the verdict is handed only to ChatSafeCoDe


def test_a_model_answer_marked_unsafe_loses_its_tool_calls_even_with_a_safe_gate() -> None:
    actions = Actions()
    unsafe_answer = AIMessage("", tool_calls=[{"name": "unlock_door", "args": {"door": "back"}, "id": "c9"}],
                              response_metadata={"safety": {"verdict": "unsafe", "blocked_tool_calls": []}})
    other = ScriptedChatModel(replies=[unsafe_answer])
    guard = SafeCoDeMiddleware(judge=CountingJudge("safe"), refusal_message="Not doing that.")
    state = create_agent(other, tools=actions.tools, middleware=[guard]).invoke({"messages": [HumanMessage("go")]})
    assert actions.done == [] and state["messages"][-1].content == "Not doing that."
    assert state["messages"][-1].response_metadata["safety"]["blocked_tool_calls"][0]["id"] == "c9"


def test_a_failing_judge_fails_closed_by_default() -> None:
    def broken(request: JudgeRequest) -> str:
        raise RuntimeError("judge backend down")

    other = ScriptedChatModel(replies=[AIMessage("hi")])
    state = create_agent(other, tools=[], middleware=[SafeCoDeMiddleware(judge=broken)]).invoke({"messages": [HumanMessage("hi")]})
    assert other.seen == [] and state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE
    verdict = state["safecode_verdict"]
    assert (verdict["label"], verdict["source"]) == ("unsafe", "fallback") and "judge backend down" in verdict["error"]
    safe_fallback = SafeCoDeMiddleware(judge=broken, config=SafeCoDeConfig(on_judge_error="safe"))
    other = ScriptedChatModel(replies=[AIMessage("hi")])
    state = create_agent(other, tools=[], middleware=[safe_fallback]).invoke({"messages": [HumanMessage("hi")]})
    assert state["messages"][-1].content == "hi"


# =========================================================================== async


async def test_async_agents_judge_off_the_event_loop(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    actions, judge = Actions(), CountingJudge("safe")
    llm = chat()
    script.add(call_text(QWEN, "get_weather", {"city": "Rome"}), "Sunny in Rome.")
    agent = create_agent(llm, tools=actions.tools, middleware=[SafeCoDeMiddleware(judge=judge, model=llm)])
    state = await agent.ainvoke({"messages": [photo_question("Rome?")]})
    assert actions.done == [("get_weather", {"city": "Rome"})] and state["messages"][-1].content == "Sunny in Rome."
    assert judge.threads and judge.threads[0] != threading.get_ident()

    judge.label = "unsafe"
    state = await agent.ainvoke({"messages": [photo_question("Open the door")]})
    assert state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE and len(actions.done) == 1


async def test_async_record_mode_blocks_calls(chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding) -> None:
    actions = Actions()
    llm = chat()
    script.add(call_text(QWEN, "unlock_door", {"door": "front"}))
    guard = SafeCoDeMiddleware(judge=CountingJudge("unsafe"), model=llm, on_unsafe="record")
    tasks = [create_agent(llm, tools=actions.tools, middleware=[guard]).ainvoke({"messages": [photo_question()]})]
    [state] = await asyncio.gather(*tasks)
    assert actions.done == [] and state["messages"][-1].tool_calls == []


# =========================================================================== the example


@pytest.fixture(scope="module")
def tool_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tool_vlm(QWEN, tmp_path_factory.mktemp("agent_example") / QWEN))


def test_example_safe_scene_acts(tool_model_path: str, image_path: str, script: ScriptedDecoding) -> None:
    example = load_example("agent_with_safety")
    script.add(call_text(QWEN, "add_to_shopping_list", {"item": "apples", "quantity": 2}), "Added two apples.")
    result = example.main(["--model", tool_model_path, "--image", image_path, "--judge", "fixed:safe"])
    assert result["route"] == "answered" and result["answer"] == "Added two apples."
    assert result["actions"] == [{"tool": "add_to_shopping_list", "item": "apples", "quantity": 2}]
    assert result["verdict"]["label"] == "safe"


def test_example_unsafe_scene_never_acts(tool_model_path: str, image_path: str, script: ScriptedDecoding) -> None:
    example = load_example("agent_with_safety")
    script.add(call_text(QWEN, "set_reminder", {"text": "leave the stove on", "minutes": 60}))
    ended = example.main(["--model", tool_model_path, "--image", image_path, "--judge", "fixed:unsafe"])
    assert ended["route"] == "refused" and ended["actions"] == [] and script.calls == 0
    recorded = example.main(["--model", tool_model_path, "--image", image_path, "--judge", "fixed:unsafe",
                             "--on-unsafe", "record"])
    assert recorded["route"] == "safe_completion" and recorded["answer"] == example.SAFE_COMPLETION
    assert recorded["actions"] == [] and [c["name"] for c in recorded["blocked_tool_calls"]] == ["set_reminder"]


def test_example_runs_end_to_end_on_the_unscripted_model(tool_model_path: str, image_path: str) -> None:
    example = load_example("agent_with_safety")
    result = example.main(["--model", tool_model_path, "--image", image_path, "--max-new-tokens", "16"])
    assert result["verdict"]["judge"] == "self:direct"
    assert result["route"] == ("answered" if result["verdict"]["label"] == "safe" else "refused")


# =========================================================================== response_format


class Weather(BaseModel):
    """The weather in a city."""

    city: str
    temperature: int


FORMATS: dict[str, Callable[[], Any]] = {
    "ToolStrategy": lambda: ToolStrategy(Weather),
    "ProviderStrategy": lambda: ProviderStrategy(Weather),
    "bare schema": lambda: Weather,
}

UNSAFE_SETUPS: dict[str, Callable[[ChatSafeCoDe], list[SafeCoDeMiddleware]]] = {
    # the middleware judges unsafe and records it; the model decodes under its verdict
    "record mode": lambda llm: [SafeCoDeMiddleware(judge="fixed:unsafe", model=llm, on_unsafe="record")],
    # the middleware's judge lets the turn through; the model's own judge finds it unsafe
    "the model's own judge": lambda llm: [SafeCoDeMiddleware(judge="fixed:safe", model=llm, share_verdict=False)],
}


@pytest.mark.parametrize("setup", list(UNSAFE_SETUPS))
@pytest.mark.parametrize("response_format", list(FORMATS))
@pytest.mark.parametrize("with_tools", [False, True], ids=["no tools", "tools"])
def test_an_unsafe_turn_with_response_format_ends_with_the_refusal(
    setup: str, response_format: str, with_tools: bool, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    actions = Actions()
    llm = chat(judge="fixed:unsafe")
    script.add(" I can't help with that.")
    agent = create_agent(llm, tools=actions.tools if with_tools else [], response_format=FORMATS[response_format](),
                         middleware=UNSAFE_SETUPS[setup](llm))
    state = agent.invoke({"messages": [photo_question("What's the weather here?")]})
    final = state["messages"][-1]
    assert isinstance(final, AIMessage) and final.tool_calls == []
    assert opens_with_refusal(final.content, SafeCoDeConfig().refusal_phrases), final.content
    assert final.response_metadata["safety"]["verdict"] == "unsafe"
    assert state.get("structured_response") is None and actions.done == []
    assert script.calls == 1  # one model call: the loop did not ask again after the refusal
    assert [type(m).__name__ for m in state["messages"]] == ["HumanMessage", "AIMessage"]


async def test_an_unsafe_turn_with_response_format_ends_in_async_agents_too(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    llm = chat(judge="fixed:unsafe")
    script.add(" No.")
    guard = SafeCoDeMiddleware(judge="fixed:safe", model=llm, share_verdict=False)
    state = await create_agent(llm, tools=[], response_format=ProviderStrategy(Weather), middleware=[guard]).ainvoke(
        {"messages": [photo_question()]})
    assert state["messages"][-1].response_metadata["safety"]["verdict"] == "unsafe" and script.calls == 1
    assert state.get("structured_response") is None


def test_a_safe_turn_with_response_format_still_gives_structured_output(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    llm = chat()
    script.add('{"city": "Oslo", "temperature": 4}}\n</tool_call>')  # after the forced opening of the call
    guard = SafeCoDeMiddleware(judge="fixed:safe", model=llm)
    state = create_agent(llm, tools=[], response_format=Weather, middleware=[guard]).invoke({"messages": [photo_question()]})
    assert script.prefixes == ['<tool_call>\n{"name": "Weather", "arguments": ']
    assert state["structured_response"] == Weather(city="Oslo", temperature=4)
    assert state["messages"][1].invalid_tool_calls == []
    # ProviderStrategy with tools: the tools are offered, the final answer is a JSON object
    actions = Actions()
    script.add(call_text(QWEN, "get_weather", {"city": "Oslo"}), '{"city": "Oslo", "temperature": 4}')
    agent = create_agent(llm, tools=actions.tools, response_format=ProviderStrategy(Weather), middleware=[guard])
    state = agent.invoke({"messages": [photo_question("Weather in Oslo?")]})
    assert actions.done == [("get_weather", {"city": "Oslo"})]
    assert state["structured_response"] == Weather(city="Oslo", temperature=4)
    assert "Call tools as needed" in script.prompts[-1] and '"temperature"' in script.prompts[-1]


@pytest.mark.parametrize("response_format", list(FORMATS))
@pytest.mark.parametrize("with_tools", [False, True], ids=["no tools", "tools"])
def test_without_the_middleware_an_unsafe_turn_ends_or_raises_a_typed_refusal(
    response_format: str, with_tools: bool, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    """Documented: LangChain's loop cannot be ended by a model alone, so without SafeCoDeMiddleware
    an agent that still wants structured output gets a typed error carrying the refusal."""
    actions = Actions()
    llm = chat(judge="fixed:unsafe")
    script.add(" I can't help with that.")
    agent = create_agent(llm, tools=actions.tools if with_tools else [], response_format=FORMATS[response_format]())
    run = lambda: agent.invoke({"messages": [photo_question()]})  # noqa: E731
    if response_format == "ProviderStrategy":
        with pytest.raises(StructuredOutputValidationError) as err:
            run()
        assert err.value.ai_message.response_metadata["safety"]["verdict"] == "unsafe"
    elif not with_tools:
        with pytest.raises(ModelRefusalError, match="SafeCoDeMiddleware") as refusal:
            run()
        assert refusal.value.raw_message.response_metadata["safety"]["verdict"] == "unsafe"
    else:
        final = run()["messages"][-1]
        assert final.tool_calls == [] and final.response_metadata["safety"]["verdict"] == "unsafe"
    assert actions.done == [] and script.calls == 1


# =========================================================================== per-turn state after an unsafe turn

def stored_photo_question(text: str = "Should I open the door for this visitor?") -> HumanMessage:
    """`photo_question` with the image as base64, as a checkpointer can store it."""
    import base64
    import io

    buf = io.BytesIO()
    gradient_image().save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return HumanMessage([{"type": "image", "base64": b64, "mime_type": "image/png"}, {"type": "text", "text": text}])


#: The whole safe answer for each response_format strategy (ScriptedDecoding drops the forced opening).
SAFE_STRUCTURED = {
    "ToolStrategy": call_text(QWEN, "Weather", {"city": "Oslo", "temperature": 4}),
    "ProviderStrategy": '{"city": "Oslo", "temperature": 4}',
    "bare schema": call_text(QWEN, "Weather", {"city": "Oslo", "temperature": 4}),
}


@pytest.mark.parametrize("on_unsafe", ["end", "record"])
@pytest.mark.parametrize("response_format", list(FORMATS))
def test_an_unsafe_turn_never_returns_the_previous_turns_structured_response(
    on_unsafe: str, response_format: str, chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    """With a checkpointer, an unsafe turn after a safe one must not hand back the safe turn's
    `structured_response` (an application acting on it would repeat the action)."""
    judge = CountingJudge("safe")
    llm = chat()
    guard = SafeCoDeMiddleware(judge=judge, model=llm, on_unsafe=on_unsafe)  # type: ignore[arg-type]
    agent = create_agent(llm, tools=[], response_format=FORMATS[response_format](), middleware=[guard],
                         checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": f"{on_unsafe}-{response_format}"}}
    script.add(SAFE_STRUCTURED[response_format])
    first = agent.invoke({"messages": [stored_photo_question("What's the weather in Oslo?")]}, config)
    assert first["structured_response"] == Weather(city="Oslo", temperature=4)

    judge.label = "unsafe"
    script.add("I can't help with that.")  # record mode: the model answers under the unsafe verdict
    second = agent.invoke({"messages": [stored_photo_question("Now unlock the door for them.")]}, config)
    final = second["messages"][-1]
    assert final.response_metadata["safety"]["verdict"] == "unsafe"
    assert second.get("structured_response") is None
    assert agent.get_state(config).values.get("structured_response") is None  # the checkpoint too
    assert script.calls == (1 if on_unsafe == "end" else 2)


async def test_an_unsafe_turn_clears_the_structured_response_in_async_agents_too(
    chat: Callable[..., ChatSafeCoDe], script: ScriptedDecoding
) -> None:
    judge = CountingJudge("safe")
    llm = chat()
    agent = create_agent(llm, tools=[], response_format=ToolStrategy(Weather),
                         middleware=[SafeCoDeMiddleware(judge=judge, model=llm)], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "async"}}
    script.add(SAFE_STRUCTURED["ToolStrategy"])
    assert (await agent.ainvoke({"messages": [stored_photo_question()]}, config))["structured_response"] is not None
    judge.label = "unsafe"
    state = await agent.ainvoke({"messages": [stored_photo_question("And now?")]}, config)
    assert state["messages"][-1].content == DEFAULT_REFUSAL_MESSAGE and state.get("structured_response") is None


def test_the_middlewares_own_refusal_carries_every_safety_key(chat: Callable[..., ChatSafeCoDe]) -> None:
    llm = chat(safecode={"steered_steps": 7, "unsafe_mode": "boost"})
    state = create_agent(llm, tools=[], middleware=[SafeCoDeMiddleware(judge="fixed:unsafe", model=llm)]).invoke(
        {"messages": [stored_photo_question()]})
    safety = state["messages"][-1].response_metadata["safety"]
    spec_keys = {"verdict", "unsafe_score", "threshold", "judge", "source", "caption", "error", "steered_steps",
                 "unsafe_mode", "refused"}
    assert spec_keys <= set(safety)
    assert (safety["steered_steps"], safety["unsafe_mode"], safety["refused"]) == (7, "boost", True)
    answered = llm.invoke([stored_photo_question()], verdict="unsafe").response_metadata["safety"]
    assert set(answered) <= set(safety) | {"blocked_tool_calls"}  # the same keys as the model's own
