"""`SafeCoDeMiddleware`: a SafeCoDe judge guarding a LangChain v1 agent (`create_agent`).

    from langchain.agents import create_agent
    from safecode_guard import ChatSafeCoDe
    from safecode_guard.middleware import SafeCoDeMiddleware

    llm = ChatSafeCoDe(model="./Qwen2.5-VL-3B-Instruct")
    agent = create_agent(llm, tools=[...], middleware=[SafeCoDeMiddleware(model=llm)])
    state = agent.invoke({"messages": [HumanMessage([image_block, {"type": "text", "text": "..."}])]})
    state["safecode_verdict"]["label"]   # "safe" | "unsafe"

Flow, per model call of the agent loop:

1. `before_model` judges the latest user turn (its text and every image the
   user sent) once; later loop iterations of the same turn reuse the
   verdict kept in the agent state (`safecode_verdict`). On an unsafe
   verdict it either ends the run with a refusal message
   (`on_unsafe="end"`, before the agent's model runs at all) or only
   records it (`on_unsafe="record"`). A turn the middleware ends also
   clears the agent's `structured_response` (with a checkpointer it would
   otherwise still hold the previous turn's). This works whatever the agent's model
   is: the judge is the middleware's, not the model's.
2. `wrap_model_call`: when the agent's model is a `ChatSafeCoDe`, the
   middleware's verdict is handed to it (`verdict=`), so the model decodes
   under the same verdict and does not judge a second time; its answer's
   `safety.source` then says "override" and `safety.judge` names the
   middleware's judge. `share_verdict=False` lets the model judge on its own.
   Under a recorded unsafe verdict an agent's `response_format` is dropped
   for the call: structured output is acted on like a tool call, so the
   model answers in words instead. If the model's own judge finds the turn
   unsafe and its refusal cannot be parsed as structured output, the refusal
   becomes the answer instead of LangChain's parse error.
3. `after_model`: an unsafe turn ends with its answer. An answer that
   carries tool calls under an unsafe verdict (the answer's own
   `response_metadata["safety"]`, or the recorded verdict of this turn)
   loses them: an unsafe scene must not trigger actions. The calls are
   listed in the answer's `safety["blocked_tool_calls"]`. (`ChatSafeCoDe`
   already drops them itself; this also covers other models in
   `on_unsafe="record"` mode.) The run ends there in every agent
   configuration, with or without tools and `response_format` (whose loop
   would otherwise ask the model again after its refusal).

Without this middleware, an agent whose `ChatSafeCoDe` refuses still ends
when it has tools (no tool call, no further step); with `response_format`
and no tools, LangChain's loop asks the model again and `ChatSafeCoDe`
raises `ModelRefusalError`; with `ProviderStrategy`, LangChain raises its own
`StructuredOutputValidationError`. Add the middleware to end all of them
with the refusal.

Async agents get the same hooks; the judge's blocking work runs in a
worker thread, so the event loop stays free.

Needs the optional agent packages: `pip install 'safecode-guard[agents]'`.
The judge sees the whole conversation (`judge_request_from_messages`): the
system message, every user turn and its images, earlier answers and their
tool calls, and tool results. When tool results come in during a turn, the
turn is judged again before the model reads them, so a tool returning
harmful content (or instructions) is judged in context too.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ModelRequest,
        ModelResponse,
        hook_config,
    )
except ImportError as exc:  # tested by hiding the package
    raise ImportError(
        "safecode_guard.middleware needs LangChain v1 agents (the `langchain` and `langgraph` "
        f"packages): {exc}. Install them with `pip install 'safecode-guard[agents]'`."
    ) from exc

from langchain.agents.structured_output import StructuredOutputError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from typing_extensions import NotRequired

from .config import InputPolicy, SafeCoDeConfig
from .errors import InvalidVerdictError, JudgeError, SafeCoDeInputError
from .judges import JudgeRequest, SelfJudge, _judge_name, make_judge, run_judge
from .lc_messages import message_role, to_hf_message
from .verdict import Verdict, validated_verdict

__all__ = ["DEFAULT_REFUSAL_MESSAGE", "SafeCoDeMiddleware", "SafeCoDeState", "judge_request_from_messages"]

DEFAULT_REFUSAL_MESSAGE = (
    "I can't help with this request: in its context (including any images you sent) it could cause "
    "harm. If you had something else in mind, tell me more and I'll suggest a safe way to go about it."
)

OnUnsafe = Literal["end", "record"]


class SafeCoDeState(AgentState):
    """The agent state with the middleware's verdict for the latest user turn."""

    safecode_verdict: NotRequired[dict[str, Any] | None]
    """`Verdict.to_dict()` plus "message_id" (the user turn it judged) and "messages_judged"
    (how many messages the judge saw; tool results after them are judged again)."""


def _latest_human(messages: Sequence[BaseMessage]) -> HumanMessage | None:
    return next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)


def judge_request_from_messages(
    messages: Sequence[BaseMessage], policy: InputPolicy, threshold: float
) -> JudgeRequest | None:
    """The judge's view of an agent conversation: every turn, every user image, the latest user text.

    The judge sees what the agent's model sees that could make the request
    unsafe: the system message, every user turn with its images, earlier
    assistant turns with their tool calls, and tool results. None when there
    is no user turn. User images are decoded under `policy` (bad images raise
    the usual typed errors). A non-user turn holding blocks a local model
    cannot read (the agent's model may be another provider's) is kept as its
    text and tool calls plus a note of what was left out, so the judge still
    sees it rather than failing the turn.
    """
    turns = [_judge_turn(m, i, policy) for i, m in enumerate(messages)]
    if not any(t["role"] == "user" for t in turns):
        return None
    return JudgeRequest.from_messages(turns, threshold=threshold)


def _judge_turn(message: BaseMessage, index: int, policy: InputPolicy) -> dict[str, Any]:
    """One message as the judge reads it (see `judge_request_from_messages`)."""
    try:
        return to_hf_message(message, index, policy)
    except SafeCoDeInputError:
        try:
            role = message_role(message, f"messages[{index}]")
        except SafeCoDeInputError:  # e.g. a legacy FunctionMessage: a tool result by another name
            role = "tool" if message.type in ("tool", "function") else "assistant"
        if role == "user":
            raise  # the user's own content: the same typed error the model would give
    try:
        skipped = sum(1 for b in message.content_blocks if b.get("type") != "text")
    except (ValueError, TypeError, KeyError):
        skipped = 1
    note = f"\n[{skipped} content block(s) the judge cannot read]" if skipped else ""
    turn: dict[str, Any] = {"role": role, "content": [{"type": "text", "text": message.text + note}]}
    if role == "assistant" and getattr(message, "tool_calls", None):
        turn["tool_calls"] = [
            {"id": c.get("id"), "function": {"name": c["name"], "arguments": c.get("args", {})}}
            for c in message.tool_calls
        ]
    if role == "tool":
        turn.update(tool_call_id=str(getattr(message, "tool_call_id", "")), name=message.name)
    return turn


#: Keys of the state record that are the middleware's own bookkeeping, not verdict fields.
_BOOKKEEPING = ("message_id", "messages_judged")


def _recorded_verdict(record: Any, config: SafeCoDeConfig, judge_name: str) -> Verdict:
    """The verdict kept in the agent state, validated again.

    The state is writable by other middleware, tools and checkpoints, and an
    invalid record (a label "UNSAFE", a NaN score) must not pass as a verdict:
    it becomes the `on_judge_error` fallback instead (or `JudgeError`).
    """
    fields = {k: v for k, v in record.items() if k not in _BOOKKEEPING} if isinstance(record, Mapping) else record
    try:
        return validated_verdict(fields)
    except InvalidVerdictError as exc:
        if config.on_judge_error == "raise":
            raise JudgeError(f"The recorded verdict of this turn is invalid: {exc}") from exc
        return Verdict(
            label=config.on_judge_error, judge=judge_name, source="fallback", error=f"{type(exc).__name__}: {exc}"
        )


def _safety(verdict: Verdict, config: SafeCoDeConfig) -> dict[str, Any]:
    """`response_metadata["safety"]` for a message the middleware writes itself: every key of
    SPEC section 5, as `ChatSafeCoDe` writes them, plus who blocked the turn."""
    from .chat_model import safety_metadata

    return {**safety_metadata(verdict, config, refused=True), "blocked_by": "SafeCoDeMiddleware"}


def _ended_turn(state: Mapping[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` for a turn the middleware ends, with the agent's per-turn output cleared.

    LangChain clears `structured_response` only when its model node runs; a turn
    ended before (or instead of) that would otherwise hand the previous turn's
    structured output back to the application (with a checkpointer), which may act
    on it again.
    """
    if state.get("structured_response") is not None:
        update["structured_response"] = None
    return update


def _refusal_response(error: StructuredOutputError) -> ModelResponse:
    """The answer behind a structured-output error, if it is a refusal under an unsafe verdict; else re-raise."""
    answer = getattr(error, "ai_message", None)
    if isinstance(answer, AIMessage) and (answer.response_metadata.get("safety") or {}).get("verdict") == "unsafe":
        return ModelResponse(result=[answer])
    raise error


class SafeCoDeMiddleware(AgentMiddleware):
    """Judge each user turn with SafeCoDe's judge before the agent's model runs; act on unsafe.

    - `judge`: a judge spec ("self", "self:caption", "fixed:unsafe",
      "chat:<provider>:<model>"), a judge object, a LangChain chat model or a
      callable. "self" judges with the local model given as `model`.
    - `model`: a `ChatSafeCoDe` or a `SafeCoDe` engine; needed for the "self"
      judges, and the source of `config` / `policy` defaults.
    - `on_unsafe`: "end" (default) ends the run with `refusal_message`;
      "record" only writes `safecode_verdict` into the state and lets the
      model answer (its tool calls are still blocked when
      `block_tool_calls`).
    - `config`: threshold, `on_judge_error` and the judge timeout
      (default: the model's, else `SafeCoDeConfig()`); `policy`: what user
      images may be (default: the model's, else `InputPolicy()`).
    - `share_verdict`: hand the verdict to a `ChatSafeCoDe` agent model.
    - `block_tool_calls`: drop tool calls and structured output made under an
      unsafe verdict, and end the run there.
    """

    state_schema = SafeCoDeState

    def __init__(
        self,
        judge: Any = "self",
        model: Any = None,
        *,
        on_unsafe: OnUnsafe = "end",
        refusal_message: str = DEFAULT_REFUSAL_MESSAGE,
        config: SafeCoDeConfig | None = None,
        policy: InputPolicy | None = None,
        share_verdict: bool = True,
        block_tool_calls: bool = True,
    ) -> None:
        super().__init__()
        from .chat_model import ChatSafeCoDe
        from .engine import SafeCoDe

        if on_unsafe not in ("end", "record"):
            raise SafeCoDeInputError(
                f"`on_unsafe` (={on_unsafe!r}) must be 'end' (stop the run with a refusal) or 'record' "
                "(keep the verdict in the agent state and go on)."
            )
        if not isinstance(refusal_message, str) or not refusal_message.strip():
            raise SafeCoDeInputError("`refusal_message` must be a non-empty string, e.g. \"I can't help with that.\"")
        if model is not None and not isinstance(model, (ChatSafeCoDe, SafeCoDe)):
            raise SafeCoDeInputError(
                f"`model` is a {type(model).__name__}; give a ChatSafeCoDe or a SafeCoDe engine (the local model "
                "the 'self' judge uses), or leave it None with a judge that needs no local model."
            )
        self.judge = make_judge(judge)
        if isinstance(self.judge, SelfJudge) and self.judge.engine is None and model is None:
            raise SafeCoDeInputError(
                f"judge={judge!r} judges with the local model, but no `model` was given. Pass "
                "model=ChatSafeCoDe(...) (or a SafeCoDe engine), or choose another judge, e.g. "
                "'chat:<provider>:<model>' or a callable taking a JudgeRequest."
            )
        self.model = model
        if isinstance(model, ChatSafeCoDe):
            default_config, default_policy = model.safecode, model.policy
        elif isinstance(model, SafeCoDe):
            default_config, default_policy = model.config, model.policy
        else:
            default_config, default_policy = SafeCoDeConfig(), InputPolicy()
        self.config = config or default_config
        self.policy = policy or default_policy
        self.on_unsafe: OnUnsafe = on_unsafe
        self.refusal_message = refusal_message
        self.share_verdict = share_verdict
        self.block_tool_calls = block_tool_calls
        self._bound: tuple[Any, Any] | None = None  # (engine, the self judge bound to it)
        self._lock = threading.Lock()

    # -- judging ----------------------------------------------------------------------------

    def _judge_impl(self) -> Any:
        """The judge, with a "self" judge bound to the model's engine (loaded on first use)."""
        if not (isinstance(self.judge, SelfJudge) and self.judge.engine is None):
            return self.judge
        from .chat_model import ChatSafeCoDe

        engine = self.model.engine if isinstance(self.model, ChatSafeCoDe) else self.model
        with self._lock:
            if self._bound is None or self._bound[0] is not engine:
                self._bound = (engine, self.judge.bind(engine))
            return self._bound[1]

    def judge_messages(self, messages: Sequence[BaseMessage]) -> Verdict | None:
        """The verdict for the latest user turn of `messages` (None without a user turn)."""
        request = judge_request_from_messages(messages, self.policy, self.config.threshold)
        if request is None:
            return None
        return run_judge(self._judge_impl(), request, self.config)

    def _record(self, state: dict[str, Any]) -> Any:
        """The state's record if it is for the latest user turn, else None.

        A record that is not even a mapping was tampered with: it counts as this turn's
        (so it is validated, and fails closed) rather than as no record at all.
        """
        record = state.get("safecode_verdict")
        human = _latest_human(state["messages"])
        if record is None or human is None:
            return None
        if isinstance(record, Mapping) and record.get("message_id") != human.id:
            return None
        return record

    def _current(self, state: dict[str, Any]) -> Verdict | None:
        """This turn's recorded verdict, validated again (an invalid record is the fallback)."""
        record = self._record(state)
        return None if record is None else _recorded_verdict(record, self.config, _judge_name(self.judge))

    def _new_tool_results(self, state: dict[str, Any]) -> bool:
        """Whether tool results arrived after this turn's verdict: what they say must be judged too."""
        record = self._record(state)
        judged = record.get("messages_judged") if isinstance(record, Mapping) else None
        if not isinstance(judged, int):
            return False
        return any(isinstance(m, ToolMessage) for m in state["messages"][judged:])

    # -- hooks ------------------------------------------------------------------------------

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: dict[str, Any], runtime: Any) -> dict[str, Any] | None:
        """Judge a new user turn (again when tool results came in); on unsafe end the run (or record it)."""
        human = _latest_human(state["messages"])
        if human is None:
            return None
        if self._record(state) is not None and not self._new_tool_results(state):
            return None  # this turn was judged on an earlier loop iteration, and nothing new came in
        verdict = self.judge_messages(state["messages"])
        assert verdict is not None  # there is a user turn
        record = {**verdict.to_dict(), "message_id": human.id, "messages_judged": len(state["messages"])}
        if verdict.unsafe and self.on_unsafe == "end":
            refusal = AIMessage(content=self.refusal_message, response_metadata={"safety": _safety(verdict, self.config)})
            return _ended_turn(state, {"safecode_verdict": record, "messages": [refusal], "jump_to": "end"})
        return {"safecode_verdict": record}

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: dict[str, Any], runtime: Any) -> dict[str, Any] | None:
        # The judge is blocking model work (or a blocking chat-model call): keep it off the loop.
        return await asyncio.to_thread(self.before_model, state, runtime)

    def _with_verdict(self, request: ModelRequest) -> ModelRequest:
        from .chat_model import ChatSafeCoDe

        verdict = self._current(request.state)
        if not self.share_verdict or verdict is None or not isinstance(request.model, ChatSafeCoDe):
            return request
        if "verdict" in request.model_settings:
            return request  # the application pinned one itself
        return request.override(model_settings={**request.model_settings, "verdict": verdict})

    def _prepared(self, request: ModelRequest) -> ModelRequest:
        """The request with this turn's verdict handed on, and no `response_format` under an unsafe one."""
        request = self._with_verdict(request)
        verdict = self._current(request.state)
        unsafe = verdict is not None and verdict.unsafe
        if unsafe and self.block_tool_calls and request.response_format is not None:
            # Structured output is data the application acts on, like a tool call: withheld.
            request = request.override(response_format=None)
        return request

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse:
        """Hand this turn's verdict to a `ChatSafeCoDe` agent model (one judge call per turn);
        keep a refusal as the answer when structured output cannot be read from it."""
        try:
            return handler(self._prepared(request))
        except StructuredOutputError as exc:
            return _refusal_response(exc)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse:
        try:
            return await handler(self._prepared(request))
        except StructuredOutputError as exc:
            return _refusal_response(exc)

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: dict[str, Any], runtime: Any) -> dict[str, Any] | None:
        """End an unsafe turn with its answer, without the tool calls made under it."""
        last = state["messages"][-1] if state["messages"] else None
        if not isinstance(last, AIMessage):
            return None
        safety = dict(last.response_metadata.get("safety") or {})
        record = self._current(state)
        answer_unsafe = safety.get("verdict") != "safe" if safety else False  # anything but a clear "safe"
        if not (answer_unsafe or (record is not None and record.unsafe)):
            return None
        calls = [*last.tool_calls, *last.invalid_tool_calls]
        if calls and self.block_tool_calls:
            blocked = [*safety.get("blocked_tool_calls", []), *(dict(c) for c in calls)]
            if not safety:
                safety = _safety(record, self.config) if record is not None else {}
            safety.update(blocked_tool_calls=blocked, blocked_by="SafeCoDeMiddleware")
            replacement = AIMessage(
                content=last.text or self.refusal_message,
                id=last.id,  # same id: the state's message reducer replaces the answer
                response_metadata={**last.response_metadata, "safety": safety},
                usage_metadata=last.usage_metadata,
            )
            return _ended_turn(state, {"messages": [replacement], "jump_to": "end"})
        if answer_unsafe or self.block_tool_calls:
            # Nothing more to do in an unsafe turn; an agent with `response_format` would
            # otherwise loop back and ask the model to go on after its refusal.
            return _ended_turn(state, {"jump_to": "end"})
        return None  # block_tool_calls=False: the application lets this turn act

    @hook_config(can_jump_to=["end"])
    async def aafter_model(self, state: dict[str, Any], runtime: Any) -> dict[str, Any] | None:
        return self.after_model(state, runtime)  # pure bookkeeping, nothing blocks
