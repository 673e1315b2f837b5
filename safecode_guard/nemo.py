"""NeMo Guardrails integration: the `safecode` engine and the SafeCoDe input-rail actions.

Needs the optional extra: `pip install 'safecode-guard[nemo]'` (NeMo Guardrails 0.24).

A NeMo config folder uses this module from its `config.py`::

    from safecode_guard.nemo import init  # NeMo calls init(app) while building LLMRails

`init(app)` checks the config and registers:

- the **`safecode` engine**: `engine: safecode` in `config.yml` builds a
  `ChatSafeCoDe` from `model:` and `parameters:` and wraps it in
  `SafeCoDeLLMAdapter`, NeMo's `LangChainLLMAdapter` with the limits a
  request-facing model needs (below). `model` and string parameters may name
  environment variables as `${NAME}` or `${NAME:-default}`, expanded once,
  when the config loads; the model `demo` is the embedded demo model.
  Parameter names and the model source are checked then too, so a typo or
  a missing model folder fails while `LLMRails` is built, not on a request.
- the **rail actions** `safecode_check_input` (the `Verdict` as a dict, for
  Colang 1.0 flows) and `safecode_check_input_outcome` (a `RailOutcome`, for
  Colang 2.x flows, parallel rails and anything else that wants NeMo's own
  verdict type);
- `safecode_generate`, which answers with the main model for Colang 2.x
  flows, images included, steered by the rail's verdict; `safecode_stream_said`
  sends what the bot says to a streaming request after the output rails
  passed it (Colang 2.x's `bot say` does not stream by itself), and
  `safecode_stream_text` streams a fixed text;
- the prompt filter `safecode_text` (text parts of a message, images as
  `[image]`) for NeMo's own check prompts, whose `{{ user_input }}` would
  otherwise paste the base64 of each image into the prompt.

What a request may change (NeMo copies request data into model calls:
`options.llm_params`, and in its server the OpenAI fields and `model`):
sampling options, token limits, `stop` and tools, nothing else. A per-call
`verdict` (which would switch the steering off) or `model` (another folder
to load) in request data is refused with `RequestOptionError` (HTTP 400
from NeMo's server). A request's `model` must be the configured model's
served name (`served_model_name`), else `ClientModelError` (HTTP 400); it is
never expanded, probed or loaded. Calls NeMo makes for its own checks
(`self check input` and other `*check*` tasks) get plain decoding within the
config's `max_new_tokens`: their prompts are not judged or steered.

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

Which model the rail judges with: the `models:` entry of the type the rail
names (`safecode check input $model=<type>` in Colang 1.0, `model="<type>"`
as an action argument), else the entry of type `safecode_rail`, else the main
model when it is a `ChatSafeCoDe` (its engine is shared: no second copy in
memory). These entries are `engine: safecode` models; their settings
(threshold, `on_judge_error`, image policy) and their own judge apply. A rail
with none of them and a judge that needs a model (`self`) fails when
`LLMRails` is built: it never falls back to another model. Which judge: the
action's `judge` argument, else `$SAFECODE_JUDGE`, else the rail model's own
judge, else `self`. Judges are cached per model and judge spec.

Nothing is loaded at import time: models load on the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import re
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from nemoguardrails.actions import action
    from nemoguardrails.actions.rail_outcome import RailOutcome
    from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter
    from nemoguardrails.llm.models.initializer import ModelInitializationError
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        "safecode_guard.nemo needs NeMo Guardrails 0.24, which is not installed. "
        "Install it with `pip install 'safecode-guard[nemo]'`."
    ) from exc

from .config import InputPolicy, SafeCoDeConfig
from .errors import (
    NemoConfigError,
    RequestOptionError,
    RequestShapeError,
    SafeCoDeError,
    SafeCoDeInputError,
    UnsupportedModelError,
    did_you_mean,
)
from .verdict import Verdict, safety_metadata, validated_verdict

if TYPE_CHECKING:
    from langchain_core.messages import BaseMessage
    from nemoguardrails.types import LLMResponse, LLMResponseChunk

    from .langchain.chat_model import ChatSafeCoDe
    from .engine.core import SafeCoDe
    from .judges import Judge

__all__ = [
    "DEFAULT_JUDGE",
    "DEMO_MODEL",
    "ENGINE_NAME",
    "JUDGE_ENV",
    "MODEL_ENV",
    "RAIL_MODEL_TYPE",
    "REQUEST_OPTIONS",
    "ClientModelError",
    "ConfiguredModelError",
    "NemoConfigError",
    "RequestOptionError",
    "RequestShapeError",
    "SafeCoDeLLMAdapter",
    "chat_model_from_config",
    "check_config",
    "check_input",
    "check_parameters",
    "check_request_options",
    "clear_caches",
    "expand_env",
    "init",
    "is_check_task",
    "provider",
    "rail_model",
    "register_provider",
    "request_messages",
    "resolve_judge",
    "resolve_model",
    "safecode_check_input",
    "safecode_check_input_outcome",
    "safecode_generate",
    "safecode_stream_said",
    "safecode_stream_text",
    "served_model_name",
    "text_of",
]

log = logging.getLogger(__name__)

ENGINE_NAME = "safecode"
"""The `engine:` value in config.yml that builds a `ChatSafeCoDe`."""
MODEL_ENV = "SAFECODE_MODEL"
"""Environment variable holding the model folder (or hub id) of the shipped configs."""
JUDGE_ENV = "SAFECODE_JUDGE"
"""Environment variable holding the judge spec ("self", "fixed:safe", "chat:openai:gpt-4o", ...)."""
DEFAULT_JUDGE = "self"
DEMO_MODEL = "demo"
"""The model name that means the embedded demo model (`safecode_guard.engine.demo_model`)."""
RAIL_MODEL_TYPE = "safecode_rail"
"""The `models:` type of the SafeCoDe rail's own model, used when the rail names no other type."""

REQUEST_OPTIONS = frozenset(
    {
        # sampling
        "temperature",
        "top_p",
        "top_k",
        "do_sample",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        # length
        "max_tokens",
        "max_new_tokens",
        "max_completion_tokens",
        "stop",
        # tools: NeMo's server forwards them for `passthrough: true`; under an unsafe
        # verdict ChatSafeCoDe answers without tool calls, so they cannot bypass the steering.
        "tools",
        "tool_choice",
        "parallel_tool_calls",
    }
)
"""The per-call options a NeMo request may set on the `safecode` engine (`options.llm_params`)."""


# --------------------------------------------------------------------------- errors


class ConfiguredModelError(SafeCoDeError, ModelInitializationError):
    """A config.yml `models:` entry of the `safecode` engine cannot be used (missing folder, parameter typo, ...).

    A `ModelInitializationError` and not a `ValueError`, so that NeMo's server
    answers HTTP 400 with this message instead of "Could not load the
    requested guardrails configuration". The message names no local path;
    the error it was raised from (`__cause__`, in the log) has the details.
    """


class ClientModelError(SafeCoDeError, ModelInitializationError):
    """A request named a model other than the configured one (NeMo's server copies a request's `model` into the config).

    A `ModelInitializationError` and not a `ValueError`, so that NeMo's server
    answers HTTP 400 with this message (it hides the text of `ValueError`s
    raised while building rails).
    """


# --------------------------------------------------------------------------- settings


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`text` with `${NAME}` and `${NAME:-default}` replaced from the environment.

    As in the shell, `:-default` applies when NAME is unset or empty; a bare
    `${NAME}` that is unset becomes "". NeMo does not expand variables in
    config.yml itself, so the provider does it for `model` and string
    parameters, once, when the config loads; never for request data.
    """
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), text)


def resolve_model(model: str | None) -> str:
    """The model folder or hub id to load: env references expanded, `demo` built on first use.

    An empty value (e.g. `${SAFECODE_MODEL}` unset) also means the demo model
    (a local folder named `demo` is `./demo`).
    """
    name = expand_env(model or "").strip()
    if name in ("", DEMO_MODEL):
        from .engine.demo_model import ensure_demo_model

        return str(ensure_demo_model())
    return name


def served_model_name(model: str | None) -> str:
    """The name a configured `model:` is served under: what clients send as `model`, what logs show.

    The hub id for a hub model, the folder's own name for a local folder
    (never the rest of its path), `demo` for the demo model. Env references
    are expanded first (this is a config value).
    """
    from .engine.loading import public_name

    name = expand_env(model or "").strip()
    return DEMO_MODEL if name in ("", DEMO_MODEL) else public_name(name)


def resolve_judge(spec: str | None) -> str | None:
    """The judge spec to use: `spec` (env references expanded), else `$SAFECODE_JUDGE`, else None.

    None means: the main model's own judge when it is a `ChatSafeCoDe`, else `self`.
    """
    for value in (spec, os.environ.get(JUDGE_ENV)):
        if value is not None and (text := expand_env(str(value)).strip()):
            return text
    return None


def _closest(name: str, choices: Sequence[str]) -> str:
    """` Did you mean 'x'?` for the choice closest to `name`, or "" when none is close."""
    close = did_you_mean(name, choices)
    return f" Did you mean {close!r}?" if close else ""


def check_parameters(parameters: Mapping[str, Any]) -> None:
    """Raise `NemoConfigError` for a config.yml `parameters:` key that `ChatSafeCoDe` has no field for.

    Pydantic would drop it silently (`judgee: fixed:unsafe` used to leave the
    `self` judge in place); the error names the key and its fix, as `ChatSafeCoDe` does.
    """
    from .langchain.chat_model import ChatSafeCoDe
    from .langchain.settings import check_nested_settings, check_settings

    try:
        check_settings(ChatSafeCoDe, [str(k) for k in parameters])
        check_nested_settings(parameters)
    except SafeCoDeInputError as exc:
        raise NemoConfigError(
            f"config.yml: a parameter of the `{ENGINE_NAME}` engine (under `models: - parameters:`) is wrong. {exc}"
        ) from exc


def check_request_options(options: Mapping[str, Any], *, allow_verdict: bool = False) -> None:
    """Raise `RequestOptionError` unless every key of `options` is one a NeMo request may set.

    `options` are the keyword arguments NeMo passes to one model call: the
    request's `llm_params` (server or `rails.generate(options=...)`) and
    NeMo's own task settings. `allow_verdict` lets a trusted caller steer
    with a `verdict` of its own.
    """
    allowed = REQUEST_OPTIONS | ({"verdict"} if allow_verdict else set())
    refused = sorted(set(options) - allowed)
    if not refused:
        return
    why = {
        "verdict": "a request must not choose the safety verdict (it would switch the steering off)",
        "model": "the model is set in config.yml, not per request",
    }
    reasons = "; ".join(f"{k!r}: {why.get(k, 'not an option of the safecode engine')}" for k in refused)
    raise RequestOptionError(
        f"The request sets option(s) {refused} that the `{ENGINE_NAME}` engine does not take from "
        f"requests ({reasons}). Allowed in `llm_params`: {sorted(REQUEST_OPTIONS)}."
    )


# --------------------------------------------------------------------------- caches

_LOCK = threading.RLock()
# (model path, parameters as JSON) -> the ChatSafeCoDe the provider built; shared by
# every LLMRails built from the same config, so a model is loaded once per process.
_CHAT_MODELS: dict[tuple[str, str], ChatSafeCoDe] = {}
# engine -> {judge spec -> judge bound to it}; weak, so a dropped model frees its judges.
_BOUND_JUDGES: weakref.WeakKeyDictionary[Any, dict[str, Judge]] = weakref.WeakKeyDictionary()
# judge spec -> judge that needs no model ("fixed:...", "chat:...").
_FREE_JUDGES: dict[str, Judge] = {}


def clear_caches() -> None:
    """Forget every cached chat model, engine and judge (their memory is freed once unused)."""
    with _LOCK:
        _CHAT_MODELS.clear()
        _BOUND_JUDGES.clear()
        _FREE_JUDGES.clear()


# --------------------------------------------------------------------------- the engine


def chat_model_from_config(model: str, **parameters: Any) -> ChatSafeCoDe:
    """The `ChatSafeCoDe` for a config.yml `models:` entry (cached per model and parameters).

    `model` and top-level string parameters go through `expand_env`;
    `parameters` reach the `ChatSafeCoDe` constructor unchanged otherwise
    (e.g. `judge`, `max_new_tokens`, `safecode: {alpha: 0.3}`). Parameter
    names (`check_parameters`) and the model source (`check_model_source`:
    the folder exists and holds a vision-language model, or the hub id is
    there) are checked now; the weights load on the first request.
    """
    from .langchain.chat_model import ChatSafeCoDe
    from .engine.loading import check_model_source

    check_parameters(parameters)
    if not expand_env(model or "").strip():
        raise NemoConfigError(
            f"config.yml: a `{ENGINE_NAME}` model entry has an empty `model:` ({model!r}; an unset "
            "environment variable expands to nothing). Set the variable, or write a folder or hub id; "
            f"`{DEMO_MODEL}` (e.g. `${{{MODEL_ENV}:-{DEMO_MODEL}}}`) for the embedded demo model."
        )
    path = resolve_model(model)
    params = {k: expand_env(v) if isinstance(v, str) else v for k, v in parameters.items()}
    key = (path, json.dumps(params, sort_keys=True, default=repr))
    with _LOCK:
        chat = _CHAT_MODELS.get(key)
        if chat is None:
            check_model_source(path)
            chat = ChatSafeCoDe(model=path, **params)
            _CHAT_MODELS[key] = chat
        return chat


@dataclass(frozen=True)
class _ModelRequest:
    """The main model's `model:` when something other than config.yml set it (NeMo's server, per request)."""

    requested: str
    configured: str


# Set by `check_config` (from init(app)) for the provider call NeMo makes next, in the
# same `LLMRails.__init__`: the provider cannot see the config, and must not take a
# request's `model` for a folder to load.
_MODEL_REQUEST: contextvars.ContextVar[_ModelRequest | None] = contextvars.ContextVar(
    "safecode_model_request", default=None
)


def _accepted_model(model: str) -> str:
    """`model` if config.yml set it, else the configured model when `model` names it; else `ClientModelError`."""
    request = _MODEL_REQUEST.get()
    if request is None or model != request.requested:
        return model
    _MODEL_REQUEST.set(None)
    served = served_model_name(request.configured)
    # Not the expanded value: a client could confirm a guessed local path by it.
    if model.strip() in (served, request.configured.strip()):
        return request.configured
    raise ClientModelError(
        f"This server answers with the model its config.yml configures, served as {served!r}; the "
        f"request asked for {model[:80]!r}. Send \"model\": {served!r} (a request cannot pick "
        "another model)."
    )


def provider(model: str, **parameters: Any) -> SafeCoDeLLMAdapter:
    """The `safecode` engine factory NeMo's default framework calls as `provider(model=..., **parameters)`.

    Returns the `ChatSafeCoDe` wrapped in `SafeCoDeLLMAdapter`, the
    `LLMModel` NeMo 0.24 expects (`adapter.raw_llm` is the chat model). A
    `model` that a request put into the config (NeMo's server does) is
    accepted only as the configured model's served name, and never loaded.
    """
    configured = _accepted_model(model)
    served = served_model_name(configured)
    try:
        chat = chat_model_from_config(configured, **parameters)
    except SafeCoDeError as exc:
        raise ConfiguredModelError(_public_reason(exc, configured, served)) from exc
    return SafeCoDeLLMAdapter(chat, served_name=served)


def _public_reason(exc: SafeCoDeError, model: str, served: str) -> str:
    """What a config.yml model entry's error says to a client of NeMo's server: no local path in it.

    Parameter errors name no path and keep their text. Errors about a local
    folder embed its path (and nearby paths as suggestions), so they are
    summed up by kind; the full text stays in the error's `__cause__` (and the log).
    """
    from .engine.loading import HubUnreachableError, ModelNotFoundError, looks_local

    expanded = expand_env(model).strip()
    if isinstance(exc, NemoConfigError) or not looks_local(expanded):
        return str(exc)
    if isinstance(exc, HubUnreachableError):
        what = "is not in the cache and the model hub cannot be reached"
    elif isinstance(exc, ModelNotFoundError):
        what = "was not found (no such model folder, or the folder holds no saved model)"
    elif isinstance(exc, UnsupportedModelError):
        what = "is not a vision-language model SafeCoDe can load"
    else:
        what = f"cannot be used ({type(exc).__name__})"
    return (
        f"config.yml: the `{ENGINE_NAME}` model {served!r} {what}. The server log has the details "
        f"(this error's cause: {type(exc).__name__})."
    )


def register_provider(name: str = ENGINE_NAME) -> None:
    """Make `engine: <name>` (default `safecode`) in config.yml build a `ChatSafeCoDe`."""
    from nemoguardrails.llm.frameworks import get_default_framework
    from nemoguardrails.llm.providers import register_chat_provider

    framework = get_default_framework()
    if framework != "default":
        # The "langchain" framework wraps whatever the provider returns once more and
        # needs langchain-community; our factory already returns NeMo's adapter.
        raise NemoConfigError(
            f"The '{name}' engine needs NeMo's default LLM framework, but "
            f"NEMOGUARDRAILS_LLM_FRAMEWORK={framework!r}: unset it. (NeMo suggests setting it when it "
            f"does not know an engine; for `engine: {name}` the cause is instead that the config "
            "folder's config.py, which registers the engine, was not loaded.) Or skip the engine and "
            "pass the model yourself: LLMRails(config, llm=SafeCoDeLLMAdapter(ChatSafeCoDe(model=...)))."
        )
    register_chat_provider(name, provider)


# --------------------------------------------------------------------------- the adapter

_CHECK_TASK_HINT = "check"
# The rail's verdict, handed by `safecode_generate` to the model call it makes (same task).
_RAIL_VERDICT: contextvars.ContextVar[Verdict | None] = contextvars.ContextVar(
    "safecode_rail_verdict", default=None
)


def _current_task() -> str | None:
    """The NeMo task of the model call being made (`llm_call_info.task`), or None outside a task."""
    from nemoguardrails.context import llm_call_info_var

    info = llm_call_info_var.get()
    return getattr(info, "task", None) if info is not None else None


def is_check_task(task: str | None) -> bool:
    """Whether a NeMo task is one of NeMo's own checks (`self_check_input`, `content_safety_check_input ...`).

    Those prompts are NeMo's, not the user's: judging and steering them would
    judge the check instead of the request. Every other call, including
    NeMo's dialog tasks whose output may reach the user, is steered.
    """
    return task is not None and _CHECK_TASK_HINT in task


class SafeCoDeLLMAdapter(LangChainLLMAdapter):
    """NeMo's `LangChainLLMAdapter` for a `ChatSafeCoDe`, with the limits of a model that serves requests.

    - Request options are limited to `REQUEST_OPTIONS` (`RequestOptionError`
      otherwise): NeMo forwards a request's `llm_params` verbatim, so a
      client could otherwise pass `verdict` or `model`. `allow_verdict=True`
      is for library callers who steer with verdicts of their own.
    - The verdict `safecode_generate` hands on reaches the call as `verdict`.
    - NeMo's own check calls (`is_check_task`) get plain decoding
      (`SafeCoDe.baseline`) capped at the chat model's `max_new_tokens`, and
      no `safety` metadata, so `llm_metadata["safety"]` is the answer's.
    - `model_name` is the served name, so NeMo's logs and errors never show
      a local path; a model that fails to load is reported without its path.
    """

    def __init__(self, llm: ChatSafeCoDe, *, served_name: str | None = None, allow_verdict: bool = False) -> None:
        super().__init__(llm)
        self._served_name = served_name or served_model_name(llm.model)
        self._allow_verdict = allow_verdict

    @property
    def model_name(self) -> str:
        return self._served_name

    @property
    def provider_name(self) -> str:
        return ENGINE_NAME

    @property
    def provider_url(self) -> None:
        return None

    def _prepare_call_params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        check_request_options(kwargs, allow_verdict=self._allow_verdict)
        params = dict(kwargs)
        if stop is not None:
            params["stop"] = stop
        verdict = _RAIL_VERDICT.get()
        if verdict is not None:
            params["verdict"] = verdict
        return params

    async def _load(self) -> None:
        """Load the engine now (once), reporting a failure without the local path it names."""
        from .control import arun_briefly

        chat = self._llm
        try:
            await arun_briefly(lambda: chat.engine)
        except Exception as exc:
            log.error("Loading the safecode model %r failed: %s", chat.model, exc, exc_info=exc)
            raise SafeCoDeError(
                f"The model {self._served_name!r} could not be loaded; the server log has the reason."
            ) from None

    async def _plain(self, prompt: Any, params: dict[str, Any]) -> Any:
        """Plain decoding of a NeMo check prompt: no judge, no steering, at most `max_new_tokens` tokens."""
        from langchain_core.messages import HumanMessage

        from .langchain.messages import to_hf_messages

        chat = self._llm
        params = {k: v for k, v in params.items() if k != "verdict"}
        stop = params.pop("stop", None)
        messages = self._to_langchain_input(prompt)
        if isinstance(messages, str):
            messages = [HumanMessage(content=messages)]

        def run() -> Any:
            _, settings = chat._call_settings(stop, params)
            settings.pop("verdict", None)
            settings["max_new_tokens"] = min(settings["max_new_tokens"], chat.max_new_tokens)
            return chat.engine.baseline(to_hf_messages(messages, chat.policy), **settings)

        return await asyncio.to_thread(run)

    async def generate_async(self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any) -> LLMResponse:
        from nemoguardrails.types import LLMResponse, UsageInfo

        with _client_errors():
            params = self._prepare_call_params(stop, kwargs)
            await self._load()
            if is_check_task(_current_task()):
                result = await self._plain(prompt, params)
                usage = result.usage
                return LLMResponse(
                    content=result.text,
                    model=self._served_name,
                    finish_reason=result.finish_reason,
                    usage=UsageInfo(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens),
                )
            response = await super().generate_async(prompt, stop=stop, **kwargs)
        response.model = self._served_name
        response.provider_metadata = _with_message_fields(response, self._served_name)
        return response

    async def stream_async(
        self, prompt: Any, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[LLMResponseChunk]:
        from nemoguardrails.types import LLMResponseChunk

        with _client_errors():
            params = self._prepare_call_params(stop, kwargs)
            await self._load()
            if is_check_task(_current_task()):
                result = await self._plain(prompt, params)
                yield LLMResponseChunk(
                    delta_content=result.text, model=self._served_name, finish_reason=result.finish_reason
                )
                return
            async for chunk in super().stream_async(prompt, stop=stop, **kwargs):
                if chunk.model:
                    chunk.model = self._served_name
                yield chunk


def _with_message_fields(response: LLMResponse, served: str) -> dict[str, Any] | None:
    """The response's provider metadata plus `response_metadata` and `usage_metadata` for a LangChain message.

    NeMo hands the metadata of the last model call to `RunnableRails`, which
    builds its `AIMessage` from the keys that are `AIMessage` fields and drops
    the rest: these two keys carry the answer's `safety` dict and token usage
    through, as `ChatSafeCoDe` itself returns them.
    """
    metadata = dict(response.provider_metadata or {})
    if "safety" not in metadata:
        return response.provider_metadata
    metadata["response_metadata"] = {
        "safety": metadata["safety"],
        "model_name": served,
        "model_provider": metadata.get("model_provider", ENGINE_NAME),
        "finish_reason": response.finish_reason,
    }
    if response.usage is not None:
        usage = response.usage
        metadata["usage_metadata"] = {
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
        }
    return metadata


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """Mark errors about the request itself (bad options, images, limits) as HTTP 400 for NeMo's server.

    NeMo's server answers a failed model call with the `status_code` of its
    cause, and 500 without one; a `SafeCoDeInputError` is the client's to fix.
    """
    try:
        yield
    except SafeCoDeInputError as exc:
        if getattr(exc, "status_code", None) is None:
            exc.status_code = 400  # type: ignore[attr-defined]
        raise


# --------------------------------------------------------------------------- checks at config load


def _configured_main_model(config: Any) -> Any:
    """The main model as the config files on disk declare it; None for a config built in code."""
    from nemoguardrails import RailsConfig

    for path in (p.strip() for p in (getattr(config, "config_path", None) or "").split(",")):
        if not path:
            continue
        try:
            on_disk = RailsConfig.from_path(path)
        except Exception:  # not a folder NeMo can read again; nothing to compare with
            continue
        main = next((m for m in on_disk.models if m.type == "main"), None)
        if main is not None:
            return main
    return None


# Calls of the SafeCoDe rail actions in Colang source (1.0 and 2.x names), with their arguments.
_RAIL_CALL = re.compile(r"\b(?:safecode_check_input(?:_outcome)?|SafecodeCheckInput(?:Outcome)?Action)\b(?:\(([^)]*)\))?")
_ARGUMENT = re.compile(r"\b(model|judge)\s*=\s*[\"']([^\"']+)[\"']")
# `$model=<type>` in a rail's flow id (`safecode check input $model=safecode_rail`), NeMo's idiom.
_MODEL_PARAM = re.compile(r"\$model\s*=\s*[\"']?([A-Za-z0-9_.-]+)")


def _flow_name(flow: Any) -> str:
    return str(flow.get("id") if isinstance(flow, Mapping) else getattr(flow, "name", ""))


def _flow_source(flow: Any) -> str:
    return str((flow.get("source_code") if isinstance(flow, Mapping) else getattr(flow, "source_code", "")) or "")


def _rail_uses(config: Any) -> list[tuple[str | None, str | None]]:
    """`(model type, judge spec)` of each use of the SafeCoDe rail in `config`; None where the use names none.

    A use is a call of a rail action in a flow. Its model type is the call's
    `model="..."` argument, else (Colang 1.0) the `$model=` of each
    `rails.input.flows` / `rails.output.flows` entry that runs that flow.
    """
    entries = [str(e) for e in (*config.rails.input.flows, *config.rails.output.flows)]
    uses: list[tuple[str | None, str | None]] = []
    for flow in config.flows:
        name = _flow_name(flow)
        for call in _RAIL_CALL.finditer(_flow_source(flow)):
            args = dict(_ARGUMENT.findall(call.group(1) or ""))
            judge = args.get("judge")
            if "model" in args:
                uses.append((args["model"], judge))
                continue
            named = [m.group(1) if (m := _MODEL_PARAM.search(e)) else None for e in entries if e.split(" $")[0].strip() == name]
            uses.extend((model_type, judge) for model_type in (named or [None]))
    return uses


def _needs_model(spec: Any) -> bool:
    """Whether the judge `spec` (None: the default) judges with a model of ours (`self`, `self:caption`)."""
    return spec is None or (isinstance(spec, str) and spec.strip().partition(":")[0].lower() == "self")


def _no_rail_model_message() -> str:
    return (
        "The SafeCoDe input rail has no model to judge with. Its judge needs one (`self`), and it found "
        f"none: the rail names no model type (`safecode check input $model=<type>`), config.yml has no "
        f"`type: {RAIL_MODEL_TYPE}` model, and the main model is not `engine: {ENGINE_NAME}`. It never "
        "falls back to another model. Add the rail's model to config.yml:\n"
        "  models:\n"
        f"    - type: {RAIL_MODEL_TYPE}\n"
        f"      engine: {ENGINE_NAME}\n"
        "      model: <local model folder or hub id>\n"
        "(integrations/nemoguardrails/safecode_rail_only is a complete example), or give the rail a judge "
        "that needs no model (SAFECODE_JUDGE=fixed:..., chat:<provider>:<model>)."
    )


def check_config(app: Any) -> None:
    """Check a config that uses SafeCoDe while NeMo builds its `LLMRails` (`init` calls this).

    - An `engine:` close to `safecode` that NeMo does not know gets the
      typo named (NeMo itself would suggest NEMOGUARDRAILS_LLM_FRAMEWORK).
    - Colang 1.0 with a SafeCoDe main model needs `passthrough: true`, or
      the images never reach the model and the request is judged twice:
      unset is an error, an explicit `passthrough: false` a warning.
    - Colang 1.0 output rails that stream must check each chunk before it is
      sent: NeMo's default `stream_first: true` sends a blocked answer first.
      Unset is an error, an explicit `stream_first: true` a warning.
    - Each use of the SafeCoDe rail has a model to judge with (`rail_model`)
      unless its judge needs none; a model type it names is an `engine:
      safecode` entry.
    - A main `model:` that differs from config.yml's (NeMo's server copies a
      request's `model` there) is handed to the provider to accept or refuse.
    """
    from nemoguardrails.llm.providers import get_provider_names

    config = app.config
    known = set(get_provider_names()) | {ENGINE_NAME}
    for model in config.models:
        if model.engine not in known and did_you_mean(model.engine, [ENGINE_NAME], cutoff=0.7):
            raise NemoConfigError(
                f"config.yml: `engine: {model.engine}` (model type {model.type!r}) is not an engine NeMo "
                f"knows. Did you mean `engine: {ENGINE_NAME}`?"
            )
    main = next((m for m in config.models if m.type == "main"), None)
    ours = (main is not None and main.engine == ENGINE_NAME and getattr(app, "llm", None) is None) or (
        _as_chat_safecode(getattr(app, "llm", None)) is not None
    )
    if ours and config.colang_version == "1.0":
        if config.passthrough is None:
            raise NemoConfigError(
                "config.yml: the main model is SafeCoDe but `passthrough:` is not set. Add "
                "`passthrough: true`, so that the user's messages, images included, reach the model. "
                "(Without it NeMo sends the model its own text prompt: images are dropped and the "
                "request is judged a second time. Set `passthrough: false` to choose that knowingly.)"
            )
        if config.passthrough is False:
            warnings.warn(
                "passthrough: false with a SafeCoDe main model: NeMo sends the model its own text "
                "prompt, so images do not reach it and each request is judged twice.",
                UserWarning,
                stacklevel=2,
            )
    _check_output_rail_streaming(config)
    _check_rail_models(config, ours)
    _MODEL_REQUEST.set(None)
    if main is not None and main.engine == ENGINE_NAME and getattr(app, "llm", None) is None:
        on_disk = _configured_main_model(config)
        if on_disk is not None and on_disk.engine == ENGINE_NAME and on_disk.model != main.model:
            _MODEL_REQUEST.set(_ModelRequest(requested=str(main.model), configured=str(on_disk.model)))


def _check_output_rail_streaming(config: Any) -> None:
    """Colang 1.0 streamed output rails: NeMo's default sends each chunk before the rails check it."""
    streaming = config.rails.output.streaming
    if config.colang_version != "1.0" or not config.rails.output.flows or streaming is None:
        return
    if not streaming.enabled or not streaming.stream_first:
        return
    if "stream_first" not in streaming.model_fields_set:
        raise NemoConfigError(
            "config.yml: output rails stream (`rails.output.streaming.enabled: true`) but `stream_first:` "
            "is not set, and NeMo's default (true) sends each chunk to the user before the output rails "
            "check it: a blocked answer is streamed anyway. Add `stream_first: false` under "
            "`rails.output.streaming` (each chunk is checked, then sent), or set `stream_first: true` to "
            "choose that knowingly."
        )
    warnings.warn(
        "rails.output.streaming.stream_first: true: each chunk is streamed before the output rails "
        "check it, so text they block reaches the user (set stream_first: false to prevent that).",
        UserWarning,
        stacklevel=3,
    )


def _check_rail_models(config: Any, main_is_ours: bool) -> None:
    """Each use of the SafeCoDe rail judges with a model it can have (`NemoConfigError` otherwise)."""
    entries = {m.type: m for m in config.models}
    for model_type, judge in _rail_uses(config):
        spec = resolve_judge(judge)
        if model_type is not None:
            entry = entries.get(model_type)
            if entry is None:
                raise NemoConfigError(
                    f"config.yml: the SafeCoDe rail names the model type {model_type!r}, but `models:` has "
                    f"no entry of that type (types: {sorted(entries)}). Add one with `engine: {ENGINE_NAME}`."
                )
            if entry.engine != ENGINE_NAME:
                raise NemoConfigError(
                    f"config.yml: the SafeCoDe rail judges with the `{model_type}` model, which has "
                    f"`engine: {entry.engine}`; the rail needs `engine: {ENGINE_NAME}` (a vision-language "
                    "model SafeCoDe loads)."
                )
            continue
        rail_entry = entries.get(RAIL_MODEL_TYPE)
        if rail_entry is not None and rail_entry.engine != ENGINE_NAME:
            raise NemoConfigError(
                f"config.yml: the `{RAIL_MODEL_TYPE}` model has `engine: {rail_entry.engine}`; the SafeCoDe "
                f"rail needs `engine: {ENGINE_NAME}`."
            )
        if rail_entry is None and not main_is_ours and _needs_model(spec):
            raise NemoConfigError(_no_rail_model_message())


# --------------------------------------------------------------------------- judging


def _unwrap(llm: Any) -> Any:
    """The LangChain model behind NeMo's `LangChainLLMAdapter` (or `llm` itself)."""
    return getattr(llm, "raw_llm", llm)


def _as_chat_safecode(llm: Any) -> ChatSafeCoDe | None:
    from .langchain.chat_model import ChatSafeCoDe

    model = _unwrap(llm)
    return model if isinstance(model, ChatSafeCoDe) else None


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
        return _as_chat_safecode(llm)
    if model_type not in models:
        raise NemoConfigError(
            f"The SafeCoDe rail names the model type {model_type!r}, but NeMo built no model of that "
            f"type (types: {sorted(models)}). Add a `models:` entry `type: {model_type}` with "
            f"`engine: {ENGINE_NAME}` to config.yml."
        )
    chat = _as_chat_safecode(models[model_type])
    if chat is None:
        raise NemoConfigError(
            f"The SafeCoDe rail's model (type {model_type!r}) is a {type(_unwrap(models[model_type])).__name__}, "
            f"not a SafeCoDe model: give it `engine: {ENGINE_NAME}` in config.yml."
        )
    return chat


def _judge_for(spec: Any, engine: Callable[[], SafeCoDe]) -> Judge:
    """The judge for `spec` (a spec string or a judge object); a self judge is bound to `engine()`.

    `engine` is only called for a self judge, so fixed and chat judges never load a model.
    """
    from .judges import SelfJudge, make_judge
    from .judges.guard import load_if_guard

    if not isinstance(spec, str):
        judge = make_judge(spec)
        if isinstance(judge, SelfJudge) and judge.engine is None:
            return judge.bind(engine())
        return load_if_guard(judge)
    with _LOCK:
        judge = _FREE_JUDGES.get(spec)
        if judge is None:
            judge = make_judge(spec)
            if not isinstance(judge, SelfJudge):
                _FREE_JUDGES[spec] = judge
    if not isinstance(judge, SelfJudge):
        return load_if_guard(judge)  # a guard model loads once (outside the lock), before any judging
    with _LOCK:
        bound_engine = engine()
        judges = _BOUND_JUDGES.setdefault(bound_engine, {})
        if spec not in judges:
            judges[spec] = judge.bind(bound_engine)
        return judges[spec]


def _no_rail_model() -> SafeCoDe:
    raise NemoConfigError(_no_rail_model_message())


def _judge_setup(llm: Any, spec: Any) -> tuple[Judge, SafeCoDeConfig, InputPolicy]:
    """The judge, the settings its verdict follows, and the image policy, for one rail call.

    `llm` is the rail's model (`rail_model`). A `ChatSafeCoDe` lends its
    settings (threshold, `on_judge_error`, `InputPolicy`) and its own judge is
    the default; a self judge shares its engine. Otherwise the defaults, and a
    judge that needs a model is a `NemoConfigError` (never another model).
    """
    chat = _as_chat_safecode(llm)
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
    from .openai_messages import to_langchain

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
    from .judges import JudgeRequest, run_judge
    from .langchain.messages import to_hf_messages
    from .prompting import parse_messages

    spec = resolve_judge(judge) if judge is None or isinstance(judge, str) else judge
    judge_impl, config, policy = _judge_setup(llm, spec)
    try:
        lc_messages = _to_langchain(request_messages(user_message, conversation))
        # The tools the request offers the model are judged with it (as ChatSafeCoDe formats them).
        conv = parse_messages(to_hf_messages(lc_messages, policy), policy).with_request(tools=_request_tools())
    except ValueError as exc:  # SafeCoDeInputError, and langchain-core rejecting a message shape
        # Fail closed: content the judge cannot read, the model cannot answer either.
        fallback = Verdict(
            label="unsafe",
            judge=getattr(judge_impl, "name", "unknown"),
            source="fallback",
            error=f"{type(exc).__name__}: {exc}",
        )
        return fallback, None
    request = JudgeRequest.from_conversation(conv, threshold=config.threshold)
    return run_judge(judge_impl, request, config), request


def _request_tools() -> list[dict[str, Any]] | None:
    """The tools this NeMo request offers the model (`options.llm_params`, which NeMo's server fills
    from a request's `tools`), formatted as `ChatSafeCoDe` formats them; None when none are offered."""
    from nemoguardrails.context import generation_options_var

    from .langchain.tools import format_tools

    options = generation_options_var.get()
    params = getattr(options, "llm_params", None) or {}
    tools = params.get("tools") if isinstance(params, Mapping) else None
    if not tools or params.get("tool_choice") == "none":  # "none": the model is not shown them
        return None
    return format_tools(tools)


def _current_request() -> Any:
    """NeMo's raw request for this call (the messages given to generate/stream), or None."""
    from nemoguardrails.context import raw_llm_request

    raw = raw_llm_request.get()
    return raw if isinstance(raw, list) else None


def _check_colang2_request(config: Any) -> None:
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
    raw = _current_request() or []
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


async def _acheck(
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
    _check_colang2_request(config)
    message = next(
        (m for m in (user_message, text, (context or {}).get("user_message")) if m is not None), ""
    )
    from .judges import hand_off_verdict

    if model is None:
        # NeMo's idiom: the rail's flow id names the model type (`safecode check input $model=...`).
        triggered = (context or {}).get("triggered_input_rail")
        found = _MODEL_PARAM.search(triggered) if isinstance(triggered, str) else None
        model = found.group(1) if found else None
    from nemoguardrails.exceptions import LLMCallException

    try:
        chat = rail_model(llm, llms, model)
        verdict, request = await asyncio.to_thread(
            _check, message, llm=chat, judge=judge, conversation=_current_request()
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

    from .langchain.settings import PROVIDER

    safety = {**safety_metadata(verdict, config, refused=True), "blocked_by": RAIL_NAME}
    llm_response_metadata_var.set(
        {"safety": safety, "response_metadata": {"safety": safety, "model_provider": PROVIDER}}
    )


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
    verdict = await _acheck(context, llm, judge, user_message, text, llms=llms, model=model, config=config)
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
    verdict = await _acheck(context, llm, judge, user_message, text, llms=llms, model=model, config=config)
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
    _check_colang2_request(config)
    message = user_message if user_message is not None else (context or {}).get("user_message", "")
    messages = request_messages(message, _current_request())
    options = generation_options_var.get()
    llm_params = dict((options.llm_params if options is not None else None) or {})
    handed = _verdict_option(llm, verdict).get("verdict")
    if handed is not None and not isinstance(llm, SafeCoDeLLMAdapter):
        llm_params["verdict"] = handed  # a plain LangChainLLMAdapter passes every option on
    handler = streaming_handler_var.get()
    if _output_rails_defined(state):
        handler = None  # held back until the output rails pass it (see above)
    llm_call_info_var.set(LLMCallInfo(task=Task.GENERAL.value))  # the answer, not one of NeMo's checks
    token = _RAIL_VERDICT.set(handed if isinstance(llm, SafeCoDeLLMAdapter) else None)
    try:
        response = await llm_call(llm, messages, llm_params=llm_params or None, streaming_handler=handler)
    finally:
        _RAIL_VERDICT.reset(token)
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
