"""The `safecode` engine for NeMo: one `ChatSafeCoDe` per configured model, built once and registered as a provider."""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import (
    NemoConfigError,
    SafeCoDeError,
    UnsupportedModelError,
)
from .adapter import SafeCoDeLLMAdapter
from .settings import (
    DEMO_MODEL,
    ENGINE_NAME,
    MODEL_ENV,
    ClientModelError,
    ConfiguredModelError,
    check_parameters,
    expand_env,
    resolve_model,
    served_model_name,
)

if TYPE_CHECKING:

    from ..judges import Judge
    from ..langchain.chat_model import ChatSafeCoDe


log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- caches

CACHE_LOCK = threading.RLock()
# (model path, parameters as JSON) -> the ChatSafeCoDe the provider built; shared by
# every LLMRails built from the same config, so a model is loaded once per process.
_CHAT_MODELS: dict[tuple[str, str], ChatSafeCoDe] = {}
# engine -> {judge spec -> judge bound to it}; weak, so a dropped model frees its judges.
BOUND_JUDGES: weakref.WeakKeyDictionary[Any, dict[str, Judge]] = weakref.WeakKeyDictionary()
# judge spec -> judge that needs no model ("fixed:...", "chat:...").
FREE_JUDGES: dict[str, Judge] = {}


def clear_caches() -> None:
    """Forget every cached chat model, engine and judge (their memory is freed once unused)."""
    with CACHE_LOCK:
        _CHAT_MODELS.clear()
        BOUND_JUDGES.clear()
        FREE_JUDGES.clear()


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
    # the model stack (engine, torch) loads on first use: importing safecode_guard.nemo stays cheap
    from ..engine.loading import check_model_source
    from ..langchain.chat_model import ChatSafeCoDe

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
    with CACHE_LOCK:
        chat = _CHAT_MODELS.get(key)
        if chat is None:
            check_model_source(path)
            chat = ChatSafeCoDe(model=path, **params)
            _CHAT_MODELS[key] = chat
        return chat


@dataclass(frozen=True)
class ModelRequest:
    """The main model's `model:` when something other than config.yml set it (NeMo's server, per request)."""

    requested: str
    configured: str


# Set by `check_config` (from init(app)) for the provider call NeMo makes next, in the
# same `LLMRails.__init__`: the provider cannot see the config, and must not take a
# request's `model` for a folder to load.
MODEL_REQUEST: contextvars.ContextVar[ModelRequest | None] = contextvars.ContextVar(
    "safecode_model_request", default=None
)


def _accepted_model(model: str) -> str:
    """`model` if config.yml set it, else the configured model when `model` names it; else `ClientModelError`."""
    request = MODEL_REQUEST.get()
    if request is None or model != request.requested:
        return model
    MODEL_REQUEST.set(None)
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
    # the engine package loads on first use: importing safecode_guard.nemo loads no model code
    from ..engine.loading import HubUnreachableError, ModelNotFoundError, looks_local

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


def unwrap_llm(llm: Any) -> Any:
    """The LangChain model behind NeMo's `LangChainLLMAdapter` (or `llm` itself)."""
    return getattr(llm, "raw_llm", llm)


def as_chat_safecode(llm: Any) -> ChatSafeCoDe | None:
    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..langchain.chat_model import ChatSafeCoDe

    model = unwrap_llm(llm)
    return model if isinstance(model, ChatSafeCoDe) else None
