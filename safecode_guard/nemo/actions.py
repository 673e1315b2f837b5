"""The NeMo actions (`safecode_check_input`, `safecode_generate`, streaming) and `init(app)` for config folders."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nemoguardrails.actions import action
from nemoguardrails.actions.rail_outcome import RailOutcome

from ..errors import (
    SafeCoDeError,
    SafeCoDeInputError,
)
from ..verdict import Verdict, validated_verdict
from .adapter import RAIL_VERDICT, SafeCoDeLLMAdapter
from .config_checks import check_config
from .judging import acheck, check_colang2_request, current_request, request_messages
from .provider import as_chat_safecode, register_provider

if TYPE_CHECKING:

    pass


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- actions


@action(name="safecode_check_input", is_system_action=True)
async def safecode_check_input(
    context: dict | None = None,
    llm: Any = None,
    llms: dict | None = None,
    config: Any = None,
    judge: str | None = None,
    model: str | None = None,
    user_message: Any = None,
    text: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """NeMo action: the SafeCoDe verdict on the current user turn, as `Verdict.to_dict()`.

    Colang 1.0: `$safecode_result = execute safecode_check_input`, then branch
    on `$safecode_result.label`. The turn is `user_message` or `text` when the
    flow passes one, else `$user_message`. `judge` overrides the judge spec;
    `model` names the `models:` type to judge with (see `rail_model`).
    `**kwargs` takes the extra parameters NeMo's streaming path passes.
    """
    verdict = await acheck(context, llm, judge, user_message, text, llms=llms, model=model, config=config)
    return verdict.to_dict()


@action(name="safecode_check_input_outcome", is_system_action=True)
async def safecode_check_input_outcome(
    context: dict | None = None,
    llm: Any = None,
    llms: dict | None = None,
    config: Any = None,
    judge: str | None = None,
    model: str | None = None,
    user_message: Any = None,
    text: Any = None,
    **kwargs: Any,
) -> RailOutcome:
    """NeMo action: the same verdict as a `RailOutcome` (blocked when unsafe; the verdict in `metadata`).

    Colang 2.x: `$outcome = await SafecodeCheckInputOutcomeAction(text=$input_text)`,
    then `if $outcome.is_blocked`. Also what NeMo's parallel rails require.
    """
    verdict = await acheck(context, llm, judge, user_message, text, llms=llms, model=model, config=config)
    if verdict.unsafe:
        return RailOutcome.block(
            reason=f"SafeCoDe judge {verdict.judge!r} found the request unsafe.",
            metadata=verdict.to_dict(),
        )
    return RailOutcome.allow(metadata=verdict.to_dict())


def _verdict_option(llm: Any, verdict: Any) -> dict[str, Any]:
    """`{"verdict": Verdict}` for a `ChatSafeCoDe` main model given the rail's verdict, else `{}`."""
    if verdict is None or as_chat_safecode(llm) is None:
        return {}
    if isinstance(verdict, str) and verdict in ("safe", "unsafe"):
        return {"verdict": Verdict(label=verdict, judge="rail", source="override")}
    if isinstance(verdict, (Verdict, Mapping)):
        # rebuilt and validated: a tampered record (label "UNSAFE", NaN score) is an error, never "safe"
        return {"verdict": validated_verdict(verdict)}
    raise SafeCoDeInputError(
        f"`verdict` (={verdict!r:.80}) is not a verdict; pass the rail's verdict dict "
        "(`$safecode_result`), a Verdict, 'safe' or 'unsafe', or nothing to let the model judge."
    )


# Per streaming request (NeMo's StreamingHandler): the texts already sent to its stream by
# `safecode_generate` (token by token) or `safecode_stream_text`, which `safecode_stream_said`
# must not send again when the bot says them.
_STREAMED: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def _output_rails_defined(state: Any) -> bool:
    """Whether a Colang 2.x config defines `output rails` (what `import guardrails` runs on each `bot say`)."""
    return "output rails" in (getattr(state, "flow_configs", None) or {})


@action(name="safecode_generate", is_system_action=True)
async def safecode_generate(
    llm: Any = None,
    context: dict | None = None,
    config: Any = None,
    state: Any = None,
    user_message: Any = None,
    verdict: Any = None,
    **kwargs: Any,
) -> str:
    """NeMo action: the main model's answer to the current request, images and earlier turns included.

    For Colang 2.x, whose own passthrough flow first asks the LLM for a user
    intent and then sends it only `$user_message` (no earlier turns). Colang
    1.0 configs use `passthrough: true` instead. Goes through NeMo's
    `llm_call` as NeMo's own passthrough does: the request's `llm_params`
    apply.

    Streaming: the answer streams token by token only when the config has no
    `output rails` flow. Otherwise it is held back, because the output rails
    run when the flow says it (`bot say`), after this action: the flow's
    `safecode stream what the bot says` sends what the bot then says, the
    answer or an output rail's replacement, never text an output rail blocked.

    `verdict` (the rail's verdict dict or label) is handed to a `ChatSafeCoDe`
    main model so it steers with that verdict instead of judging the request
    a second time; its `safety["source"]` is then "override". It travels
    beside the request's `llm_params`, not in them, so a request cannot set it.
    """
    from nemoguardrails.context import (
        generation_options_var,
        llm_call_info_var,
        streaming_handler_var,
    )
    from nemoguardrails.llm.call import llm_call
    from nemoguardrails.llm.types import Task
    from nemoguardrails.logging.explain import LLMCallInfo

    if llm is None:
        raise SafeCoDeError(
            "safecode_generate got no LLM: add a `type: main` model to config.yml "
            "(e.g. `engine: safecode`) or pass one with LLMRails(config, llm=...)."
        )
    check_colang2_request(config)
    message = user_message if user_message is not None else (context or {}).get("user_message", "")
    messages = request_messages(message, current_request())
    options = generation_options_var.get()
    llm_params = dict((options.llm_params if options is not None else None) or {})
    handed = _verdict_option(llm, verdict).get("verdict")
    if handed is not None and not isinstance(llm, SafeCoDeLLMAdapter):
        llm_params["verdict"] = handed  # a plain LangChainLLMAdapter passes every option on
    handler = streaming_handler_var.get()
    if _output_rails_defined(state):
        handler = None  # held back until the output rails pass it (see above)
    llm_call_info_var.set(LLMCallInfo(task=Task.GENERAL.value))  # the answer, not one of NeMo's checks
    token = RAIL_VERDICT.set(handed if isinstance(llm, SafeCoDeLLMAdapter) else None)
    try:
        response = await llm_call(llm, messages, llm_params=llm_params or None, streaming_handler=handler)
    finally:
        RAIL_VERDICT.reset(token)
    if handler is not None and response.content:
        _STREAMED.setdefault(handler, []).append(response.content)
    return response.content


@action(name="safecode_stream_said", is_system_action=True)
async def safecode_stream_said(text: str = "", **kwargs: Any) -> str:
    """NeMo action: send what the bot said to a streaming request's stream (none: nothing), and return it.

    Colang 2.x's `bot say` does not stream; the shipped `main.co` calls this
    for each bot utterance (`match UtteranceBotAction.Finished()`), which
    comes after the output rails passed the text or replaced it. A text that
    `safecode_generate` or `safecode_stream_text` already streamed is not sent again.
    """
    from nemoguardrails.context import streaming_handler_var

    handler = streaming_handler_var.get()
    if handler is None or not text:
        return text
    sent = _STREAMED.get(handler, [])
    if text in sent:
        sent.remove(text)
        return text
    await handler.push_chunk(text)
    return text


@action(name="safecode_stream_text", is_system_action=True)
async def safecode_stream_text(text: str = "", **kwargs: Any) -> str:
    """NeMo action: send `text` to a streaming request's stream (none: nothing), and return it.

    For Colang 2.x flows that do not stream what the bot says
    (`safecode_stream_said`): `await SafecodeStreamTextAction(text=$refusal)`
    before `bot say $refusal`. Never send an answer an output rail has not
    checked yet this way.
    """
    from nemoguardrails.context import streaming_handler_var

    handler = streaming_handler_var.get()
    if handler is not None and text:
        await handler.push_chunk(text)
        _STREAMED.setdefault(handler, []).append(text)
    return text


def text_of(content: Any) -> str:
    """A message's text for a text prompt: text parts as they are, each image as `[image]`.

    The Jinja filter `safecode_text` (registered by `init`) for NeMo's own
    check prompts: `{{ user_input | safecode_text }}`. NeMo pastes a
    multimodal `$user_message` (a list of content blocks) into its prompt as
    it is, base64 data included, and a 256x256 photo alone exceeds NeMo's
    16,000-character prompt limit.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        content = [content]
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
            continue
        kind = str(block.get("type", "")) if isinstance(block, Mapping) else ""
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif "image" in kind:
            parts.append("[image]")
        else:
            parts.append(f"[{kind or type(block).__name__}]")
    return " ".join(p for p in parts if p)


def init(app: Any) -> None:
    """Check the config (`check_config`), register the `safecode` engine, the actions and the prompt filter (call from config.py)."""
    register_provider()
    check_config(app)
    app.register_action(safecode_check_input, name="safecode_check_input")
    app.register_action(safecode_check_input_outcome, name="safecode_check_input_outcome")
    app.register_action(safecode_generate, name="safecode_generate")
    app.register_action(safecode_stream_said, name="safecode_stream_said")
    app.register_action(safecode_stream_text, name="safecode_stream_text")
    app.register_filter(text_of, name="safecode_text")
