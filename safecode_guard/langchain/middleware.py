"""`SafeCoDeMiddleware`: a SafeCoDe judge guarding a LangChain v1 agent (`create_agent`).

    from langchain.agents import create_agent
    from safecode_guard import ChatSafeCoDe
    from safecode_guard.middleware import SafeCoDeMiddleware

    llm = ChatSafeCoDe(model="./Qwen2.5-VL-3B-Instruct")
    agent = create_agent(llm, tools=[...], middleware=[SafeCoDeMiddleware(model=llm)])
    state = agent.invoke({"messages": [HumanMessage([image_block, {"type": "text", "text": "..."}])]})
    state["safecode_verdict"]["label"]   # "safe" | "unsafe"

Flow, per model call of the agent loop:

1. `wrap_model_call` judges what the agent's model is about to read: the
   system prompt, every message (each user turn with its images, earlier
   answers and their tool calls, tool results), the tools bound for the
   call (names, descriptions, schemas) and the response format's schema
   (`judge_request_from_messages`). A call whose view was judged before
   (same fingerprint: a later loop iteration with nothing new) reuses the
   verdict kept in the agent state (`safecode_verdict`); a new view (a new
   user turn, tool results that came in, another tool list) is judged
   again. On an unsafe verdict it either answers with a refusal instead of
   calling the model (`on_unsafe="end"`) or only records it
   (`on_unsafe="record"`). A turn the middleware ends also clears the
   agent's `structured_response` (with a checkpointer it would otherwise
   still hold the previous turn's). This works whatever the agent's model
   is: the judge is the middleware's, not the model's.
2. When the agent's model is a `ChatSafeCoDe`, the middleware's verdict is
   handed to it (`verdict=`), so the model decodes under the same verdict
   and does not judge a second time; its answer's `safety.source` then says
   "override" and `safety.judge` names the middleware's judge.
   `share_verdict=False` lets the model judge on its own. Under an unsafe
   verdict an agent's `response_format` is dropped for the call:
   structured output is acted on like a tool call, so the model answers in
   words instead. If the model's own judge finds the turn unsafe and its
   refusal cannot be parsed as structured output, the refusal becomes the
   answer instead of LangChain's parse error.
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
worker thread, so the event loop stays free. Middleware listed after this
one (inner) may still change the request; list this one last to judge the
request exactly as the model gets it.

Needs the optional agent packages: `pip install 'safecode-guard[agents]'`.
The judge sees what the model reads (`judge_request_from_messages`): the
system message, every user turn and its images, earlier answers and their
tool calls, tool results, the tools and the response schema. When tool
results come in during a turn, the turn is judged again before the model
reads them, so a tool returning harmful content (or instructions) is judged
in context too.
"""

from __future__ import annotations

import asyncio
import json
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

from langchain.agents.middleware import ExtendedModelResponse
from langchain.agents.structured_output import StructuredOutputError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.types import Command
from typing_extensions import NotRequired

from ..config import InputPolicy, SafeCoDeConfig
from ..engine.core import SafeCoDe
from ..errors import InvalidVerdictError, JudgeError, SafeCoDeInputError
from ..judges import JudgeRequest, SelfJudge, judge_name, make_judge, request_fingerprint, run_judge
from ..judges.guard import load_if_guard
from ..verdict import Verdict, safety_metadata, validated_verdict
from .chat_model import ChatSafeCoDe
from .messages import message_role, to_hf_message

__all__ = ["DEFAULT_REFUSAL_MESSAGE", "SafeCoDeMiddleware", "SafeCoDeState", "judge_request_from_messages"]

DEFAULT_REFUSAL_MESSAGE = (
    "I can't help with this request: in its context (including any images you sent) it could cause "
    "harm. If you had something else in mind, tell me more and I'll suggest a safe way to go about it."
)

OnUnsafe = Literal["end", "record"]


class SafeCoDeState(AgentState):
    """The agent state with the middleware's verdict for the latest user turn."""

    safecode_verdict: NotRequired[dict[str, Any] | None]
    """`Verdict.to_dict()` plus "message_id" (the user turn it judged), "messages_judged"
    (how many messages the judge saw) and "fingerprint" (`request_fingerprint` of what it
    judged: a model call that reads anything else is judged again)."""


def _latest_human(messages: Sequence[BaseMessage]) -> HumanMessage | None:
    return next((m for m in reversed(messages) if isinstance(m, HumanMessage)), None)


def judge_request_from_messages(
    messages: Sequence[BaseMessage],
    policy: InputPolicy,
    threshold: float,
    *,
    system_message: SystemMessage | None = None,
    tools: Sequence[Any] = (),
    response_format: Any = None,
) -> JudgeRequest | None:
    """The judge's view of an agent's model call: what the model reads.

    The system message (the agent's system prompt, which LangChain keeps out
    of `messages`), every user turn with its images, earlier assistant turns
    with their tool calls, tool results, the tools bound for the call (as
    OpenAI function schemas: names, descriptions, parameters) and the schema
    of `response_format` (a LangChain structured-output strategy or schema).
    None when there is no user turn. User images are decoded under `policy`
    (bad images raise the usual typed errors). A non-user turn holding blocks
    a local model cannot read (the agent's model may be another provider's)
    is kept as its text and tool calls plus a note of what was left out, so
    the judge still sees it rather than failing the turn.
    """
    listed = [system_message, *messages] if system_message is not None else list(messages)
    turns = [_judge_turn(m, i, policy) for i, m in enumerate(listed)]
    if not any(t["role"] == "user" for t in turns):
        return None
    return JudgeRequest.from_messages(
        turns, threshold=threshold, tools=[_tool_schema(t) for t in tools], response_schema=_response_schema(response_format)
    )


def _json_safe(value: Any) -> Any:
    # what a judge shows must be JSON; anything else (a default value object, say) as its repr
    return json.loads(json.dumps(value, ensure_ascii=False, default=repr))


def _tool_schema(tool: Any) -> dict[str, Any]:
    """A bound tool as the model's provider reads it: an OpenAI function schema, or its name and description."""
    if isinstance(tool, Mapping):  # a provider tool (e.g. {"type": "web_search"}) or a schema written out
        return _json_safe(dict(tool))
    try:
        return _json_safe(convert_to_openai_tool(tool))
    except Exception:
        return {"name": str(getattr(tool, "name", type(tool).__name__)), "description": str(getattr(tool, "description", ""))}


def _response_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema(s) of a structured-output strategy (`ToolStrategy`, `ProviderStrategy`,
    `AutoStrategy`) or a bare schema; None without one."""
    if response_format is None:
        return None
    specs = getattr(response_format, "schema_specs", None)
    if specs is None and getattr(response_format, "schema_spec", None) is not None:
        specs = [response_format.schema_spec]
    if specs:
        entries = [{"name": s.name, "description": s.description, "parameters": s.json_schema} for s in specs]
    else:
        schema = getattr(response_format, "schema", response_format)
        entries = [_tool_schema(schema)]
    return _json_safe(entries[0] if len(entries) == 1 else {"anyOf": entries})


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
_BOOKKEEPING = ("message_id", "messages_judged", "fingerprint")


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
    """Judge what the agent's model reads with SafeCoDe's judge before it runs; act on unsafe.

    - `judge`: a judge spec ("self", "self:caption", "fixed:unsafe",
      "chat:<provider>:<model>", "guard:<folder or hub id>"), a judge object, a
      LangChain chat model or a callable. "self" judges with the local model
      given as `model`. A guard judge's hazard categories are in the record
      (`state["safecode_verdict"]["categories"]`).
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
        """The judge, with a "self" judge bound to the model's engine (loaded on first use), a guard
        model loaded (before `run_judge`, so loading never counts as judging time)."""
        if not (isinstance(self.judge, SelfJudge) and self.judge.engine is None):
            return load_if_guard(self.judge)
        engine = self.model.engine if isinstance(self.model, ChatSafeCoDe) else self.model
        with self._lock:
            if self._bound is None or self._bound[0] is not engine:
                self._bound = (engine, self.judge.bind(engine))
            return self._bound[1]

    def judge_messages(self, messages: Sequence[BaseMessage], **model_call: Any) -> Verdict | None:
        """The verdict for the latest user turn of `messages` (None without a user turn).

        `model_call` takes what else the model reads, as `judge_request_from_messages`
        does: `system_message`, `tools`, `response_format`.
        """
        request = judge_request_from_messages(messages, self.policy, self.config.threshold, **model_call)
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
        return None if record is None else _recorded_verdict(record, self.config, judge_name(self.judge))

    def _judge_call(self, request: ModelRequest) -> tuple[Verdict | None, dict[str, Any] | None]:
        """The verdict on what this model call reads, and the state record to write when it was judged now.

        The view the judge gets is the model's own: the request's system message,
        messages, tools and response format. A view judged before (its fingerprint is
        in this turn's record) is not judged again; the recorded verdict is validated
        again instead.
        """
        judged = judge_request_from_messages(
            request.messages,
            self.policy,
            self.config.threshold,
            system_message=request.system_message,
            tools=request.tools,
            response_format=request.response_format,
        )
        if judged is None:
            return None, None  # no user turn: nothing to judge
        fingerprint = request_fingerprint(judged)
        record = self._record(request.state)
        if isinstance(record, Mapping) and record.get("fingerprint") == fingerprint:
            return self._current(request.state), None
        verdict = run_judge(self._judge_impl(), judged, self.config)
        human = _latest_human(request.messages) or _latest_human(request.state["messages"])
        return verdict, {
            **verdict.to_dict(),
            "message_id": human.id if human is not None else None,
            "messages_judged": len(request.state["messages"]),
            "fingerprint": fingerprint,
        }

    # -- hooks ------------------------------------------------------------------------------

    def _prepared(self, request: ModelRequest, verdict: Verdict | None) -> ModelRequest:
        """The request with this call's verdict handed on, and no `response_format` under an unsafe one."""
        if (
            self.share_verdict
            and verdict is not None
            and isinstance(request.model, ChatSafeCoDe)
            and "verdict" not in request.model_settings  # else the application pinned one itself
        ):
            request = request.override(model_settings={**request.model_settings, "verdict": verdict})
        if verdict is not None and verdict.unsafe and self.block_tool_calls and request.response_format is not None:
            # Structured output is data the application acts on, like a tool call: withheld.
            request = request.override(response_format=None)
        return request

    def _refusal(self, verdict: Verdict) -> ModelResponse:
        message = AIMessage(
            content=self.refusal_message, response_metadata={"safety": _safety(verdict, self.config)}
        )
        return ModelResponse(result=[message])

    def _respond(
        self, verdict: Verdict | None, record: dict[str, Any] | None, call: Callable[[], Any]
    ) -> ModelResponse | ExtendedModelResponse:
        """The refusal (unsafe, `on_unsafe="end"`) or the model's answer, with the new record if any."""
        if verdict is not None and verdict.unsafe and self.on_unsafe == "end":
            response = self._refusal(verdict)  # the model is never called
        else:
            try:
                response = call()
            except StructuredOutputError as exc:
                response = _refusal_response(exc)
        if record is None:
            return response
        if isinstance(response, AIMessage):
            response = ModelResponse(result=[response])
        # The state update rides with the model node's own (after_model then reads it).
        return ExtendedModelResponse(model_response=response, command=Command(update={"safecode_verdict": record}))

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelResponse | ExtendedModelResponse:
        """Judge what the model is about to read (once per view); refuse, or hand the verdict on and call it."""
        verdict, record = self._judge_call(request)
        return self._respond(verdict, record, lambda: handler(self._prepared(request, verdict)))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelResponse | ExtendedModelResponse:
        # The judge is blocking model work (or a blocking chat-model call): keep it off the loop.
        verdict, record = await asyncio.to_thread(self._judge_call, request)
        if verdict is not None and verdict.unsafe and self.on_unsafe == "end":
            return self._respond(verdict, record, lambda: None)
        try:
            response: Any = await handler(self._prepared(request, verdict))
        except StructuredOutputError as exc:
            response = _refusal_response(exc)
        return self._respond(None, record, lambda: response)

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
