"""What `ChatSafeCoDe` accepts: per-call options, sampling conventions, and checks of constructor keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..config import InputPolicy, SafeCoDeConfig
from ..errors import SafeCoDeInputError, did_you_mean

if TYPE_CHECKING:
    pass

PROVIDER = "safecode"

#: Keyword arguments one call may add (`llm.invoke(msgs, temperature=0.7)`, `llm.bind(...)`).
CALL_OPTIONS = (
    "model",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "verdict",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
)

DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")

def sampling_kwargs(
    temperature: float | None, top_p: float | None, top_k: int | None, do_sample: bool | None
) -> dict[str, Any]:
    """LangChain's sampling conventions in the engine's terms.

    `temperature=0` means deterministic (greedy) decoding, as everywhere in
    LangChain; `do_sample=None` samples exactly when a temperature above 0 is set.
    """
    if temperature == 0:
        if do_sample:
            raise SafeCoDeInputError(
                "`temperature` (=0) asks for greedy decoding but `do_sample=True` asks for sampling. "
                "Set a temperature above 0 to sample, or do_sample=False (or None) for greedy decoding."
            )
        temperature, do_sample = None, False
    if do_sample is None:
        do_sample = temperature is not None
    return {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "top_k": top_k}


# --------------------------------------------------------------------------- constructor keys

#: LangChain's standard constructor keys that have no meaning for a model running in this
#: process, each with what to do instead. They are refused, not silently dropped.
NOT_FOR_LOCAL_MODELS = {
    "base_url": "ChatSafeCoDe runs the model in this process. For a server, run `safecode-guard serve` "
    "and use an OpenAI-compatible client",
    "streaming_callback": "use callbacks=[...] or llm.stream(...)",
}

#: Names other integrations use for a setting we have under another name.
_OTHER_NAMES = {
    "model_id": "model",
    "model_path": "model",
    "max_output_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "stop_sequences": "stop",
    "judge_spec": "judge",
    "config": "safecode",
    "safecode_config": "safecode",
    "input_policy": "policy",
}


def _nested_settings() -> dict[str, str]:
    out = {name: f"safecode=SafeCoDeConfig({name}=...)" for name in SafeCoDeConfig.model_fields}
    out.update({name: f"policy=InputPolicy({name}=...)" for name in InputPolicy.model_fields})
    return out


def _setting_hint(key: str, valid: Sequence[str]) -> str:
    """What to write instead of the unknown constructor key `key`."""
    if key in NOT_FOR_LOCAL_MODELS:
        return f"`{key}`: {NOT_FOR_LOCAL_MODELS[key]}"
    nested = _nested_settings()
    if key in nested:
        return f"`{key}` is a SafeCoDe setting: pass {nested[key]}"
    if key in _OTHER_NAMES:
        return f"`{key}`: use `{_OTHER_NAMES[key]}`"
    candidates = {**{v: f"`{v}`" for v in valid}, **{k: nested[k] for k in nested}}
    close = did_you_mean(key, candidates)
    if close:
        return f"`{key}`: did you mean {candidates[close]}"
    return f"`{key}` is not a ChatSafeCoDe setting"


def check_nested_settings(data: Mapping[str, Any]) -> None:
    """`SafeCoDeInputError` for an unknown key in a `safecode=` or `policy=` given as a mapping
    (as config.yml gives them), naming the key and the closest valid one."""
    for name, config_class in (("safecode", SafeCoDeConfig), ("policy", InputPolicy)):
        value = data.get(name)
        if not isinstance(value, Mapping):
            continue
        valid = list(config_class.model_fields)
        unknown = [str(k) for k in value if k not in config_class.model_fields]
        if unknown:
            hints = []
            for key in unknown:
                close = did_you_mean(key, valid)
                hints.append(f"`{key}`" + (f" (did you mean `{close}`?)" if close else ""))
            raise SafeCoDeInputError(
                f"Unknown setting(s) in `{name}` ({config_class.__name__}): {', '.join(hints)}. "
                f"Valid keys: {valid}."
            )


def check_settings(model_class: type[BaseModel], keys: Sequence[str]) -> None:
    """`SafeCoDeInputError` naming every key that is not a field (or alias) of `model_class`, and its fix."""
    valid = {n for n, f in model_class.model_fields.items()} | {
        f.alias for f in model_class.model_fields.values() if f.alias
    }
    unknown = [k for k in keys if k not in valid]
    if unknown:
        ours = sorted(n for n in valid if n in model_class.__annotations__ or n == "max_tokens")
        raise SafeCoDeInputError(
            "Unknown setting(s) for ChatSafeCoDe: "
            + "; ".join(_setting_hint(str(k), sorted(valid)) for k in unknown)
            + f". Its own settings are {ours}, plus LangChain's (cache, callbacks, tags, metadata, "
            "rate_limiter, disable_streaming, output_version, profile, ...)."
        )


