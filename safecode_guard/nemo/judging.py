"""Judging a NeMo request: the rail's model and judge, the conversation as the judge reads it, the verdict."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config import InputPolicy, SafeCoDeConfig
from ..errors import (
    NemoConfigError,
    RequestOptionError,
    RequestShapeError,
    SafeCoDeInputError,
)
from ..langchain.messages import to_hf_messages
from ..langchain.settings import PROVIDER
from ..langchain.tools import format_tools
from ..observability.audit import shared_audit_log
from ..observability.records import observed_check
from ..openai_messages import to_langchain
from ..prompting import parse_messages
from ..verdict import Verdict, safety_metadata
from .config_checks import MODEL_PARAM, no_rail_model_message
from .provider import BOUND_JUDGES, CACHE_LOCK, FREE_JUDGES, as_chat_safecode, unwrap_llm
from .settings import DEFAULT_JUDGE, ENGINE_NAME, RAIL_MODEL_TYPE, resolve_judge

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from ..engine.core import SafeCoDe
    from ..judges import Judge
    from ..langchain.chat_model import ChatSafeCoDe


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- judging


def rail_model(llm: Any, llms: Mapping[str, Any] | None = None, model_type: str | None = None) -> ChatSafeCoDe | None:
    """The `ChatSafeCoDe` the SafeCoDe rail judges with, or None when there is none.

    `llms` are NeMo's models by `models:` type (the `llms` action parameter).
    The model of `model_type` when the rail names one (an error if there is
    none, or it is not a `ChatSafeCoDe`), else the `safecode_rail` model,
    else `llm` (NeMo's main model) when it is a `ChatSafeCoDe`.
    """
    models = llms or {}
    if model_type is None and RAIL_MODEL_TYPE in models:
        model_type = RAIL_MODEL_TYPE
    if model_type is None:
        return as_chat_safecode(llm)
    if model_type not in models:
        raise NemoConfigError(
            f"The SafeCoDe rail names the model type {model_type!r}, but NeMo built no model of that "
            f"type (types: {sorted(models)}). Add a `models:` entry `type: {model_type}` with "
            f"`engine: {ENGINE_NAME}` to config.yml."
        )
    chat = as_chat_safecode(models[model_type])
    if chat is None:
        raise NemoConfigError(
            f"The SafeCoDe rail's model (type {model_type!r}) is a {type(unwrap_llm(models[model_type])).__name__}, "
            f"not a SafeCoDe model: give it `engine: {ENGINE_NAME}` in config.yml."
        )
    return chat


def _judge_for(spec: Any, engine: Callable[[], SafeCoDe]) -> Judge:
    """The judge for `spec` (a spec string or a judge object); a self judge is bound to `engine()`.

    `engine` is only called for a self judge, so fixed and chat judges never load a model.
    """
    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..judges import SelfJudge, make_judge

    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..judges.guard import load_if_guard

    if not isinstance(spec, str):
        judge = make_judge(spec)
        if isinstance(judge, SelfJudge) and judge.engine is None:
            return judge.bind(engine())
        return load_if_guard(judge)
    with CACHE_LOCK:
        judge = FREE_JUDGES.get(spec)
        if judge is None:
            judge = make_judge(spec)
            if not isinstance(judge, SelfJudge):
                FREE_JUDGES[spec] = judge
    if not isinstance(judge, SelfJudge):
        return load_if_guard(judge)  # a guard model loads once (outside the lock), before any judging
    with CACHE_LOCK:
        bound_engine = engine()
        judges = BOUND_JUDGES.setdefault(bound_engine, {})
        if spec not in judges:
            judges[spec] = judge.bind(bound_engine)
        return judges[spec]


def _no_rail_model() -> SafeCoDe:
    raise NemoConfigError(no_rail_model_message())


def _judge_setup(llm: Any, spec: Any) -> tuple[Judge, SafeCoDeConfig, InputPolicy]:
    """The judge, the settings its verdict follows, and the image policy, for one rail call.

    `llm` is the rail's model (`rail_model`). A `ChatSafeCoDe` lends its
    settings (threshold, `on_judge_error`, `InputPolicy`) and its own judge is
    the default; a self judge shares its engine. Otherwise the defaults, and a
    judge that needs a model is a `NemoConfigError` (never another model).
    """
    chat = as_chat_safecode(llm)
    if chat is not None:
        judge = _judge_for(chat.judge if spec is None else spec, lambda: chat.engine)
        return judge, chat.safecode, chat.policy
    judge = _judge_for(DEFAULT_JUDGE if spec is None else spec, _no_rail_model)
    return judge, SafeCoDeConfig(), InputPolicy()


_ROLES = ("system", "developer", "user", "assistant", "tool")


def request_messages(
    user_message: Any, conversation: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The request as OpenAI-style messages: earlier turns of `conversation`, then the current user turn.

    `user_message` is NeMo's `$user_message` (a string, or a list of content
    blocks when images are sent); it stands for the last user turn of
    `conversation` (NeMo's raw request, if any), because input rails may have
    rewritten it. Earlier turns count because their images are part of the
    request's visual context, and tool calls and their results are what the
    model sees too. NeMo's own "context" turns are left out.
    """
    if not isinstance(user_message, (str, list, tuple)):
        raise SafeCoDeInputError(
            f"The user message is a {type(user_message).__name__}; NeMo should pass a string or a "
            "list of content blocks. Send messages like "
            '[{"role": "user", "content": "..."}] to rails.generate(messages=...).'
        )
    turns = [
        {
            "role": m["role"],
            "content": m.get("content") or "",
            **{k: m[k] for k in ("tool_calls", "tool_call_id", "name") if m.get(k) is not None},
        }
        for m in (conversation or ())
        if isinstance(m, Mapping) and m.get("role") in _ROLES
    ]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=len(turns))
    content = user_message if isinstance(user_message, str) else list(user_message)
    return [*turns[:last_user], {"role": "user", "content": content}]


def _to_langchain(messages: list[dict[str, Any]]) -> list[BaseMessage]:

    return to_langchain(messages)


def check_input(
    user_message: Any,
    *,
    llm: Any = None,
    judge: Any = None,
    conversation: Sequence[Mapping[str, Any]] | None = None,
) -> Verdict:
    """The verdict on the current user turn (text and images), in the context of `conversation`.

    Blocking (the judge may run the model): the actions call this in a worker thread.

    Args:
        user_message: the current user turn, a string or a list of OpenAI-style
            or LangChain content blocks.
        llm: the model to judge with (an `LLMModel`, e.g. `LangChainLLMAdapter`,
            or a LangChain model; see `rail_model`); a `ChatSafeCoDe` lends its
            engine and settings. Without one, only judges that need no model
            work (`NemoConfigError` for `self`).
        judge: a judge spec or judge object (see `make_judge`); None:
            `$SAFECODE_JUDGE`, else the model's own judge when it is a
            `ChatSafeCoDe`, else "self".
        conversation: the whole request as OpenAI-style messages (NeMo's raw
            request); its earlier turns are judged too.
    """
    return _check(user_message, llm=llm, judge=judge, conversation=conversation)[0]


def _check(
    user_message: Any,
    *,
    llm: Any,
    judge: Any,
    conversation: Sequence[Mapping[str, Any]] | None,
) -> tuple[Verdict, Any]:
    """`check_input`, also returning the `JudgeRequest` judged (None when the input was unreadable)."""
    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..judges import JudgeRequest, run_judge

    spec = resolve_judge(judge) if judge is None or isinstance(judge, str) else judge
    judge_impl, config, policy = _judge_setup(llm, spec)
    # the rail model's audit log (`audit_log:` in its config.yml parameters) records each check
    chat = as_chat_safecode(llm)
    audit = shared_audit_log(chat.audit_log) if chat is not None and chat.audit_log is not None else None
    hf_messages: list[Any] = []
    with observed_check(chat.display_name() if chat is not None else "rail", hf_messages, audit) as decided:
        try:
            lc_messages = _to_langchain(request_messages(user_message, conversation))
            hf_messages.extend(to_hf_messages(lc_messages, policy))
            # The tools the request offers the model are judged with it (as ChatSafeCoDe formats them).
            conv = parse_messages(hf_messages, policy).with_request(tools=_request_tools())
        except ValueError as exc:  # SafeCoDeInputError, and langchain-core rejecting a message shape
            # Fail closed: content the judge cannot read, the model cannot answer either.
            fallback = Verdict(
                label="unsafe",
                judge=getattr(judge_impl, "name", "unknown"),
                source="fallback",
                error=f"{type(exc).__name__}: {exc}",
            )
            decided(fallback)
            return fallback, None
        request = JudgeRequest.from_conversation(conv, threshold=config.threshold)
        verdict = run_judge(judge_impl, request, config)
        decided(verdict)
        return verdict, request


def _request_tools() -> list[dict[str, Any]] | None:
    """The tools this NeMo request offers the model (`options.llm_params`, which NeMo's server fills
    from a request's `tools`), formatted as `ChatSafeCoDe` formats them; None when none are offered."""
    from nemoguardrails.context import generation_options_var


    options = generation_options_var.get()
    params = getattr(options, "llm_params", None) or {}
    tools = params.get("tools") if isinstance(params, Mapping) else None
    if not tools or params.get("tool_choice") == "none":  # "none": the model is not shown them
        return None
    return format_tools(tools)


def current_request() -> Any:
    """NeMo's raw request for this call (the messages given to generate/stream), or None."""
    from nemoguardrails.context import raw_llm_request

    raw = raw_llm_request.get()
    return raw if isinstance(raw, list) else None


def check_colang2_request(config: Any) -> None:
    """Refuse, before anything runs, a request a Colang 2.x config would answer wrongly or fail on.

    NeMo 0.24 makes every user message of a Colang 2.x request a turn of its
    own, answered one after the other without the others, and refuses
    assistant messages: two user messages cannot be answered as one
    conversation (the first would be judged and answered twice, the last
    never): `RequestShapeError`. It also rejects the `output_vars`, `log` and
    `llm_output` options for 2.x, but only after the model has answered (a
    500 from its server): `RequestOptionError`. Both are HTTP 400, raised as
    NeMo's `LLMCallException`, the only error NeMo passes on out of an
    action, so the caller sees the reason.
    """
    from nemoguardrails.context import generation_options_var
    from nemoguardrails.exceptions import LLMCallException

    if getattr(config, "colang_version", None) != "2.x":
        return
    raw = current_request() or []
    users = sum(1 for m in raw if isinstance(m, Mapping) and m.get("role") == "user")
    if users > 1:
        error: SafeCoDeInputError = RequestShapeError(
            f"This request has {users} user messages; Colang 2.x configs answer one. NeMo 0.24 makes "
            "each user message of a Colang 2.x request a turn of its own (answered separately, without "
            "the others) and refuses assistant messages, so earlier turns cannot be sent. Send the "
            "current user message alone (system messages may come first), or use a Colang 1.0 config "
            "(e.g. integrations/nemoguardrails/safecode) for conversations."
        )
        raise LLMCallException(error, status=400)
    options = generation_options_var.get()
    log_options = getattr(options, "log", None)
    asked = [
        name
        for name, on in (
            ("output_vars", bool(getattr(options, "output_vars", None))),
            ("log", any(getattr(log_options, f, False) for f in ("activated_rails", "llm_calls", "internal_events", "colang_history"))),
            ("llm_output", bool(getattr(options, "llm_output", False))),
        )
        if on
    ]
    if asked:
        error = RequestOptionError(
            f"The request asks for the option(s) {asked}, which NeMo 0.24 does not support for Colang "
            "2.x configs (it would reject them only after the model answered). Leave them out, or use a "
            "Colang 1.0 config (e.g. integrations/nemoguardrails/safecode), which returns the rail's "
            "verdict in `output_data`."
        )
        raise LLMCallException(error, status=400)


async def acheck(
    context: Mapping[str, Any] | None,
    llm: Any,
    judge: str | None,
    user_message: Any,
    text: Any,
    *,
    llms: Mapping[str, Any] | None = None,
    model: str | None = None,
    config: Any = None,
) -> Verdict:
    check_colang2_request(config)
    message = next(
        (m for m in (user_message, text, (context or {}).get("user_message")) if m is not None), ""
    )
    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..judges import hand_off_verdict

    if model is None:
        # NeMo's idiom: the rail's flow id names the model type (`safecode check input $model=...`).
        triggered = (context or {}).get("triggered_input_rail")
        found = MODEL_PARAM.search(triggered) if isinstance(triggered, str) else None
        model = found.group(1) if found else None
    from nemoguardrails.exceptions import LLMCallException

    try:
        chat = rail_model(llm, llms, model)
        verdict, request = await asyncio.to_thread(
            _check, message, llm=chat, judge=judge, conversation=current_request()
        )
    except NemoConfigError as exc:
        # A config the load-time check could not see (a flow built in code, a judge object):
        # passed on as NeMo's LLMCallException, so the caller gets this message.
        raise LLMCallException(exc) from exc
    if request is not None:
        # Set here, in the action's own task: the model call that follows in this request
        # sees it and, judging the same request with the same judge, reuses the verdict.
        hand_off_verdict(request, verdict)
    if verdict.unsafe:
        _report_refusal(verdict, chat.safecode if chat is not None else SafeCoDeConfig())
    return verdict


RAIL_NAME = "safecode check input"


def _report_refusal(verdict: Verdict, config: SafeCoDeConfig) -> None:
    """Offer the rail's verdict as the request's LLM metadata, for a refusal no model call will follow.

    NeMo returns the last model call's metadata as `GenerationResponse.llm_metadata`,
    and `RunnableRails` passes its `response_metadata` key to the `AIMessage`
    it builds; a refused request has no model call, so this is where its
    verdict can go. A model call that does follow (a flow that lets the
    request through anyway) replaces it. Colang 1.0 only: 2.x runs actions in
    tasks of their own, whose context variables NeMo never reads.
    """
    from nemoguardrails.context import llm_response_metadata_var


    safety = {**safety_metadata(verdict, config, refused=True), "blocked_by": RAIL_NAME}
    llm_response_metadata_var.set(
        {"safety": safety, "response_metadata": {"safety": safety, "model_provider": PROVIDER}}
    )


