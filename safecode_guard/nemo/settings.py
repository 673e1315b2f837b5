"""Settings of the NeMo integration: environment references, model and judge names, parameter and option checks."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from nemoguardrails.llm.models.initializer import ModelInitializationError

from ..errors import (
    NemoConfigError,
    RequestOptionError,
    SafeCoDeError,
    SafeCoDeInputError,
    did_you_mean,
)
from ..langchain.settings import check_nested_settings, check_settings

if TYPE_CHECKING:

    pass


log = logging.getLogger(__name__)

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
        # the engine package loads on first use: importing safecode_guard.nemo loads no model code
        from ..engine.demo_model import ensure_demo_model

        return str(ensure_demo_model())
    return name


def served_model_name(model: str | None) -> str:
    """The name a configured `model:` is served under: what clients send as `model`, what logs show.

    The hub id for a hub model, the folder's own name for a local folder
    (never the rest of its path), `demo` for the demo model. Env references
    are expanded first (this is a config value).
    """

    name = expand_env(model or "").strip()
    # the engine package loads on first use: importing safecode_guard.nemo loads no model code
    from ..engine.loading import public_name

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
    # heavy (torch): loaded on first use, so importing safecode_guard.nemo stays cheap
    from ..langchain.chat_model import ChatSafeCoDe

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


