"""NeMo Guardrails integration: the `safecode` engine and the SafeCoDe input-rail actions.

Needs the optional extra: `pip install 'safecode-guard[nemo]'` (NeMo Guardrails 0.24).

A NeMo config folder uses this module from its `config.py`::

    from safecode_guard.nemo import init  # NeMo calls init(app) while building LLMRails

`init(app)` registers:

- the **`safecode` engine**: `engine: safecode` in `config.yml` builds a
  `ChatSafeCoDe` from `model:` and `parameters:` and wraps it in NeMo's
  `LangChainLLMAdapter` (what NeMo 0.24's default framework expects). `model`
  and string parameters may name environment variables as `${NAME}` or
  `${NAME:-default}`; the model `demo` is the embedded demo model.
- the **rail actions** `safecode_check_input` (the `Verdict` as a dict, for
  Colang 1.0 flows) and `safecode_check_input_outcome` (a `RailOutcome`, for
  Colang 2.x flows, parallel rails and anything else that wants NeMo's own
  verdict type);
- `safecode_generate`, which answers with the main model for Colang 2.x
  flows, images included, optionally steered by the rail's verdict.

Input flow of the actions: the current user turn (`$user_message`: a string,
or OpenAI-style blocks with `image_url` data URLs when images are sent) plus
the earlier turns of the request NeMo is answering -> LangChain messages ->
`lc_messages.to_hf_messages` (images decoded under the model's `InputPolicy`,
so http(s) URLs are not fetched unless it allows them) -> `JudgeRequest` ->
`run_judge`. This is the conversion `ChatSafeCoDe` itself applies, so the rail
judges what the model will see.

Output flow: a `Verdict`. The action only decides; the Colang flow renders the
consequence (a refusal and `stop`). A request whose content cannot be read
(corrupt image, unsupported block) gives a fail-closed verdict
(`label="unsafe"`, `source="fallback"`, the error text kept): the model could
not answer it either.

Which judge: the action's `judge` argument, else `$SAFECODE_JUDGE`, else the
main model's own judge when it is a `ChatSafeCoDe`, else `self`. A `self`
judge needs the model: it shares the main model's engine when the main model
is a `ChatSafeCoDe` (no second copy in memory); otherwise it loads
`$SAFECODE_MODEL` (default: the demo model) once. Engines, chat models and
judges are cached per model path and judge spec.

Nothing is loaded at import time: models load on the first request.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

try:
    from nemoguardrails.actions import action
    from nemoguardrails.actions.rail_outcome import RailOutcome
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        "safecode_guard.nemo needs NeMo Guardrails 0.24, which is not installed. "
        "Install it with `pip install 'safecode-guard[nemo]'`."
    ) from exc

from .config import InputPolicy, SafeCoDeConfig
from .errors import SafeCoDeError, SafeCoDeInputError
from .verdict import Verdict

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage

    from .chat_model import ChatSafeCoDe
    from .engine import SafeCoDe
    from .judges import Judge

__all__ = [
    "DEFAULT_JUDGE",
    "DEMO_MODEL",
    "ENGINE_NAME",
    "JUDGE_ENV",
    "MODEL_ENV",
    "chat_model_from_config",
    "check_input",
    "clear_caches",
    "expand_env",
    "init",
    "provider",
    "register_provider",
    "request_messages",
    "resolve_judge",
    "resolve_model",
    "safecode_check_input",
    "safecode_check_input_outcome",
    "safecode_generate",
]

ENGINE_NAME = "safecode"
"""The `engine:` value in config.yml that builds a `ChatSafeCoDe`."""
MODEL_ENV = "SAFECODE_MODEL"
"""Environment variable holding the model folder (or hub id) of the shipped configs."""
JUDGE_ENV = "SAFECODE_JUDGE"
"""Environment variable holding the judge spec ("self", "fixed:safe", "chat:openai:gpt-4o", ...)."""
DEFAULT_JUDGE = "self"
DEMO_MODEL = "demo"
"""The model name that means the embedded demo model (`safecode_guard.demo_model`)."""

# --------------------------------------------------------------------------- settings


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`text` with `${NAME}` and `${NAME:-default}` replaced from the environment.

    As in the shell, `:-default` applies when NAME is unset or empty; a bare
    `${NAME}` that is unset becomes "". NeMo does not expand variables in
    config.yml itself, so the provider does it for `model` and string parameters.
    """
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def resolve_model(model: str | None) -> str:
    """The model folder or hub id to load: env references expanded, `demo` built on first use.

    An empty value (e.g. `${SAFECODE_MODEL}` unset) also means the demo model
    (a local folder named `demo` is `./demo`).
    """
    name = expand_env(model or "").strip()
    if name in ("", DEMO_MODEL):
        from .demo_model import ensure_demo_model

        return str(ensure_demo_model())
    return name


def resolve_judge(spec: str | None) -> str | None:
    """The judge spec to use: `spec` (env references expanded), else `$SAFECODE_JUDGE`, else None.

    None means: the main model's own judge when it is a `ChatSafeCoDe`, else `self`.
    """
    for value in (spec, os.environ.get(JUDGE_ENV)):
        if value is not None and (text := expand_env(str(value)).strip()):
            return text
    return None


# --------------------------------------------------------------------------- caches

_LOCK = threading.RLock()
# (model path, parameters as JSON) -> the ChatSafeCoDe the provider built; shared by
# every LLMRails built from the same config, so a model is loaded once per process.
_CHAT_MODELS: dict[tuple[str, str], ChatSafeCoDe] = {}
# model path -> engine loaded for a rail whose main model is not a ChatSafeCoDe.
_ENGINES: dict[str, SafeCoDe] = {}
# engine -> {judge spec -> judge bound to it}; weak, so a dropped model frees its judges.
_BOUND_JUDGES: weakref.WeakKeyDictionary[Any, dict[str, Judge]] = weakref.WeakKeyDictionary()
# judge spec -> judge that needs no model ("fixed:...", "chat:...").
_FREE_JUDGES: dict[str, Judge] = {}


def clear_caches() -> None:
    """Forget every cached chat model, engine and judge (their memory is freed once unused)."""
    with _LOCK:
        _CHAT_MODELS.clear()
        _ENGINES.clear()
        _BOUND_JUDGES.clear()
        _FREE_JUDGES.clear()


# --------------------------------------------------------------------------- the engine


def chat_model_from_config(model: str, **parameters: Any) -> ChatSafeCoDe:
    """The `ChatSafeCoDe` for a config.yml `models:` entry (cached per model and parameters).

    `model` and top-level string parameters go through `expand_env`;
    `parameters` reach the `ChatSafeCoDe` constructor unchanged otherwise
    (e.g. `judge`, `max_new_tokens`, `safecode: {alpha: 0.3}`). The weights
    load on the first request, not here.
    """
    from .chat_model import ChatSafeCoDe

    path = resolve_model(model)
    params = {k: expand_env(v) if isinstance(v, str) else v for k, v in parameters.items()}
    key = (path, json.dumps(params, sort_keys=True, default=repr))
    with _LOCK:
        chat = _CHAT_MODELS.get(key)
        if chat is None:
            chat = ChatSafeCoDe(model=path, **params)
            _CHAT_MODELS[key] = chat
        return chat


def provider(model: str, **parameters: Any) -> Any:
    """The `safecode` engine factory NeMo's default framework calls as `provider(model=..., **parameters)`.

    Returns the `ChatSafeCoDe` wrapped in `LangChainLLMAdapter`, the `LLMModel`
    NeMo 0.24 expects (`adapter.raw_llm` is the chat model).
    """
    from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter

    return LangChainLLMAdapter(chat_model_from_config(model, **parameters))


def register_provider(name: str = ENGINE_NAME) -> None:
    """Make `engine: <name>` (default `safecode`) in config.yml build a `ChatSafeCoDe`."""
    from nemoguardrails.llm.frameworks import get_default_framework
    from nemoguardrails.llm.providers import register_chat_provider

    framework = get_default_framework()
    if framework != "default":
        # The "langchain" framework wraps whatever the provider returns once more and
        # needs langchain-community; our factory already returns NeMo's adapter.
        raise SafeCoDeError(
            f"The '{name}' engine needs NeMo's default LLM framework, but "
            f"NEMOGUARDRAILS_LLM_FRAMEWORK={framework!r}. Unset it, or skip the engine and pass the "
            "model yourself: LLMRails(config, llm=LangChainLLMAdapter(ChatSafeCoDe(model=...)))."
        )
    register_chat_provider(name, provider)


# --------------------------------------------------------------------------- judging


def _unwrap(llm: Any) -> Any:
    """The LangChain model behind NeMo's `LangChainLLMAdapter` (or `llm` itself)."""
    return getattr(llm, "raw_llm", llm)


def _as_chat_safecode(llm: Any) -> ChatSafeCoDe | None:
    from .chat_model import ChatSafeCoDe

    model = _unwrap(llm)
    return model if isinstance(model, ChatSafeCoDe) else None


def _engine_for_path(path: str) -> SafeCoDe:
    """An engine for the model at `path`: a provider-built chat model's if there is one, else loaded once."""
    with _LOCK:
        for (chat_path, _), chat in _CHAT_MODELS.items():
            if chat_path == path:
                return chat.engine
        engine = _ENGINES.get(path)
        if engine is None:
            from .engine import SafeCoDe

            engine = SafeCoDe.from_pretrained(path)
            _ENGINES[path] = engine
        return engine


def _judge_for(spec: Any, engine: Callable[[], SafeCoDe]) -> Judge:
    """The judge for `spec` (a spec string or a judge object); a self judge is bound to `engine()`.

    `engine` is only called for a self judge, so fixed and chat judges never load a model.
    """
    from .judges import SelfJudge, make_judge

    if not isinstance(spec, str):
        judge = make_judge(spec)
        if isinstance(judge, SelfJudge) and judge.engine is None:
            return judge.bind(engine())
        return judge
    with _LOCK:
        judge = _FREE_JUDGES.get(spec)
        if judge is None:
            judge = make_judge(spec)
            if not isinstance(judge, SelfJudge):
                _FREE_JUDGES[spec] = judge
        if not isinstance(judge, SelfJudge):
            return judge
        bound_engine = engine()
        judges = _BOUND_JUDGES.setdefault(bound_engine, {})
        if spec not in judges:
            judges[spec] = judge.bind(bound_engine)
        return judges[spec]


def _judge_setup(llm: Any, spec: Any) -> tuple[Judge, SafeCoDeConfig, InputPolicy]:
    """The judge, the settings its verdict follows, and the image policy, for one rail call.

    With a `ChatSafeCoDe` main model, its settings apply to the rail too (threshold,
    `on_judge_error`, `InputPolicy`), its own judge is the default, and a self judge
    shares its engine. Otherwise the defaults, and a self judge runs on `$SAFECODE_MODEL`.
    """
    chat = _as_chat_safecode(llm)
    if chat is not None:
        judge = _judge_for(chat.judge if spec is None else spec, lambda: chat.engine)
        return judge, chat.safecode, chat.policy
    judge = _judge_for(
        DEFAULT_JUDGE if spec is None else spec,
        lambda: _engine_for_path(resolve_model(os.environ.get(MODEL_ENV))),
    )
    return judge, SafeCoDeConfig(), InputPolicy()


_ROLES = ("system", "user", "assistant")


def request_messages(
    user_message: Any, conversation: Sequence[Mapping[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The request as OpenAI-style messages: earlier turns of `conversation`, then the current user turn.

    `user_message` is NeMo's `$user_message` (a string, or a list of content
    blocks when images are sent); it stands for the last user turn of
    `conversation` (NeMo's raw request, if any), because input rails may have
    rewritten it. Earlier turns count because their images are part of the
    request's visual context. Only system, user and assistant turns are kept
    (NeMo adds "context" turns of its own).
    """
    if not isinstance(user_message, (str, list, tuple)):
        raise SafeCoDeInputError(
            f"The user message is a {type(user_message).__name__}; NeMo should pass a string or a "
            "list of content blocks. Send messages like "
            '[{"role": "user", "content": "..."}] to rails.generate(messages=...).'
        )
    turns = [
        {"role": m["role"], "content": m.get("content") or ""}
        for m in (conversation or ())
        if isinstance(m, Mapping) and m.get("role") in _ROLES
    ]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=len(turns))
    content = user_message if isinstance(user_message, str) else list(user_message)
    return [*turns[:last_user], {"role": "user", "content": content}]


def _to_langchain(messages: list[dict[str, Any]]) -> list[BaseMessage]:
    from langchain_core.messages import convert_to_messages

    return convert_to_messages(messages)


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
        llm: NeMo's main model (an `LLMModel`, e.g. `LangChainLLMAdapter`) or a
            LangChain model; a `ChatSafeCoDe` lends its engine and settings.
        judge: a judge spec or judge object (see `make_judge`); None:
            `$SAFECODE_JUDGE`, else the main model's own judge when it is a
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
    from .judges import JudgeRequest, run_judge
    from .lc_messages import to_hf_messages
    from .prompting import parse_messages

    spec = resolve_judge(judge) if judge is None or isinstance(judge, str) else judge
    judge_impl, config, policy = _judge_setup(llm, spec)
    try:
        lc_messages = _to_langchain(request_messages(user_message, conversation))
        conv = parse_messages(to_hf_messages(lc_messages, policy), policy)
    except ValueError as exc:  # SafeCoDeInputError, and langchain-core rejecting a message shape
        # Fail closed: content the judge cannot read, the model cannot answer either.
        fallback = Verdict(
            label="unsafe",
            judge=getattr(judge_impl, "name", "unknown"),
            source="fallback",
            error=f"{type(exc).__name__}: {exc}",
        )
        return fallback, None
    request = JudgeRequest(
        images=conv.images,
        request=conv.request,
        conversation=conv.messages,
        threshold=config.threshold,
    )
    return run_judge(judge_impl, request, config), request


def _current_request() -> Any:
    """NeMo's raw request for this call (the messages given to generate/stream), or None."""
    from nemoguardrails.context import raw_llm_request

    raw = raw_llm_request.get()
    return raw if isinstance(raw, list) else None


async def _acheck(
    context: Mapping[str, Any] | None, llm: Any, judge: str | None, user_message: Any, text: Any
) -> Verdict:
    message = next(
        (m for m in (user_message, text, (context or {}).get("user_message")) if m is not None), ""
    )
    from .judges import hand_off_verdict

    verdict, request = await asyncio.to_thread(
        _check, message, llm=llm, judge=judge, conversation=_current_request()
    )
    if request is not None:
        # Set here, in the action's own task: the model call that follows in this request
        # sees it and, judging the same request with the same judge, reuses the verdict.
        hand_off_verdict(request, verdict)
    return verdict


# --------------------------------------------------------------------------- actions


@action(name="safecode_check_input", is_system_action=True)
async def safecode_check_input(
    context: dict | None = None,
    llm: Any = None,
    judge: str | None = None,
    user_message: Any = None,
    text: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """NeMo action: the SafeCoDe verdict on the current user turn, as `Verdict.to_dict()`.

    Colang 1.0: `$safecode_result = execute safecode_check_input`, then branch
    on `$safecode_result.label`. The turn is `user_message` or `text` when the
    flow passes one, else `$user_message`. `judge` overrides the judge spec.
    `**kwargs` takes the extra parameters NeMo's streaming path passes.
    """
    verdict = await _acheck(context, llm, judge, user_message, text)
    return verdict.to_dict()


@action(name="safecode_check_input_outcome", is_system_action=True)
async def safecode_check_input_outcome(
    context: dict | None = None,
    llm: Any = None,
    judge: str | None = None,
    user_message: Any = None,
    text: Any = None,
    **kwargs: Any,
) -> RailOutcome:
    """NeMo action: the same verdict as a `RailOutcome` (blocked when unsafe; the verdict in `metadata`).

    Colang 2.x: `$outcome = await SafecodeCheckInputOutcomeAction(text=$input_text)`,
    then `if $outcome.is_blocked`. Also what NeMo's parallel rails require.
    """
    verdict = await _acheck(context, llm, judge, user_message, text)
    if verdict.unsafe:
        return RailOutcome.block(
            reason=f"SafeCoDe judge {verdict.judge!r} found the request unsafe.",
            metadata=verdict.to_dict(),
        )
    return RailOutcome.allow(metadata=verdict.to_dict())


def _verdict_option(llm: Any, verdict: Any) -> dict[str, Any]:
    """`{"verdict": Verdict}` for a `ChatSafeCoDe` main model given the rail's verdict, else `{}`."""
    if verdict is None or _as_chat_safecode(llm) is None:
        return {}
    if isinstance(verdict, Mapping) and verdict.get("label") in ("safe", "unsafe"):
        verdict = Verdict.model_validate(dict(verdict))
    elif verdict in ("safe", "unsafe"):
        verdict = Verdict(label=verdict, judge="rail", source="override")
    if not isinstance(verdict, Verdict):
        raise SafeCoDeInputError(
            f"`verdict` (={verdict!r:.80}) is not a verdict; pass the rail's verdict dict "
            "(`$safecode_result`), a Verdict, 'safe' or 'unsafe', or nothing to let the model judge."
        )
    return {"verdict": verdict}


@action(name="safecode_generate", is_system_action=True)
async def safecode_generate(
    llm: Any = None,
    context: dict | None = None,
    user_message: Any = None,
    verdict: Any = None,
    **kwargs: Any,
) -> str:
    """NeMo action: the main model's answer to the current request, images and earlier turns included.

    For Colang 2.x, whose own passthrough flow first asks the LLM for a user
    intent and then sends it only `$user_message` (no earlier turns). Colang
    1.0 configs use `passthrough: true` instead. Goes through NeMo's
    `llm_call`, so the model's `response_metadata` (the `safety` dict) becomes
    the `llm_metadata` of `rails.generate(..., options=...)`.

    `verdict` (the rail's verdict dict or label) is handed to a `ChatSafeCoDe`
    main model so it steers with that verdict instead of judging the request
    a second time; its `safety["source"]` is then "override".
    """
    from nemoguardrails.llm.call import llm_call

    if llm is None:
        raise SafeCoDeError(
            "safecode_generate got no LLM: add a `type: main` model to config.yml "
            "(e.g. `engine: safecode`) or pass one with LLMRails(config, llm=...)."
        )
    message = user_message if user_message is not None else (context or {}).get("user_message", "")
    messages = request_messages(message, _current_request())
    response = await llm_call(llm, messages, llm_params=_verdict_option(llm, verdict) or None)
    return response.content


def init(app: Any) -> None:
    """Register the `safecode` engine and the three actions with an `LLMRails` (call from config.py)."""
    register_provider()
    app.register_action(safecode_check_input, name="safecode_check_input")
    app.register_action(safecode_check_input_outcome, name="safecode_check_input_outcome")
    app.register_action(safecode_generate, name="safecode_generate")
