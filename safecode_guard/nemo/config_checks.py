"""Checks run when a NeMo config loads: the main model, the rails' models, output-rail streaming."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import (
    NemoConfigError,
    did_you_mean,
)
from .provider import MODEL_REQUEST, ModelRequest, as_chat_safecode
from .settings import ENGINE_NAME, RAIL_MODEL_TYPE, resolve_judge

if TYPE_CHECKING:

    pass


log = logging.getLogger(__name__)

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
MODEL_PARAM = re.compile(r"\$model\s*=\s*[\"']?([A-Za-z0-9_.-]+)")


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
            named = [m.group(1) if (m := MODEL_PARAM.search(e)) else None for e in entries if e.split(" $")[0].strip() == name]
            uses.extend((model_type, judge) for model_type in (named or [None]))
    return uses


def _needs_model(spec: Any) -> bool:
    """Whether the judge `spec` (None: the default) judges with a model of ours (`self`, `self:caption`)."""
    return spec is None or (isinstance(spec, str) and spec.strip().partition(":")[0].lower() == "self")


def no_rail_model_message() -> str:
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
        as_chat_safecode(getattr(app, "llm", None)) is not None
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
    MODEL_REQUEST.set(None)
    if main is not None and main.engine == ENGINE_NAME and getattr(app, "llm", None) is None:
        on_disk = _configured_main_model(config)
        if on_disk is not None and on_disk.engine == ENGINE_NAME and on_disk.model != main.model:
            MODEL_REQUEST.set(ModelRequest(requested=str(main.model), configured=str(on_disk.model)))


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
            raise NemoConfigError(no_rail_model_message())


