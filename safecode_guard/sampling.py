"""`SamplingParams`: every decoding option of one request, with one set of limits.

The engine takes it (its keyword arguments build one), and the faces that
receive decoding options (the OpenAI protocol of the server, `ChatSafeCoDe`,
NeMo request options) map their names onto it, so a value is accepted or
refused the same way everywhere, with the same message. The limits are
OpenAI's where OpenAI has the option (temperature 0..2, penalties -2..2,
logit bias -100..100, top_logprobs 0..20) and transformers' / vLLM's for the
rest (top_k, min_p, repetition_penalty, min_tokens).

Adding an option is one field here (with its row in `LIMITS`), then reading
it where decoding uses it (`ops.Sampling`, `engine.decoding.Steering`).
Limits that depend on the model or the input policy (the largest
`max_new_tokens`, token ids in `logit_bias`) are checked by the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InputLimitError, SafeCoDeInputError, did_you_mean

__all__ = [
    "LIMITS", "MAX_LOGIT_BIAS", "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "MAX_TOP_LOGPROBS", "SamplingParams", "openai_code", "sampling_params", "token_id",
]

#: Most stop strings one request may give, and the longest each may be (characters).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
#: Most tokens one `logit_bias` may name.
MAX_LOGIT_BIAS = 300
#: Most alternatives `top_logprobs` may ask for per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20

#: field -> (the accepted values in words, how to fix a bad one): the table the README shows, and
#: every refusal's wording.
LIMITS: dict[str, tuple[str, str]] = {
    "max_new_tokens": ("an integer from 1 (the model's input policy sets the largest)", "Ask for at least one token."),
    "do_sample": ("true or false", "False is greedy decoding."),
    "temperature": ("a number from 0 to 2, as in OpenAI's API", "0 means greedy decoding; 1 samples the model as it is."),
    "top_p": ("a number in (0, 1]", "Use 1.0 to turn nucleus sampling off."),
    "top_k": ("a non-negative integer", "Use 0 to turn it off."),
    "min_p": ("a number from 0 to 1", "0 turns it off; 0.05 to 0.1 is usual."),
    "repetition_penalty": ("a number in (0, 2]", "1.0 turns it off; above 1 discourages repeating the answer's tokens."),
    "presence_penalty": ("a number from -2.0 to 2.0, as in OpenAI's API", "0 turns it off."),
    "frequency_penalty": ("a number from -2.0 to 2.0, as in OpenAI's API", "0 turns it off."),
    "logit_bias": (
        f"a map of at most {MAX_LOGIT_BIAS} token ids to biases from -100 to 100",
        "Use the tokenizer's ids, e.g. {1234: -100}.",
    ),
    "stop": (
        f"a string or a list of at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
        "Use a few short markers, e.g. stop=['\\n\\n'].",
    ),
    "seed": ("an integer from 0 to 2**63 - 1", "Leave it out for fresh randomness on every call."),
    "min_tokens": ("an integer from 0 up to max_new_tokens", "0 turns it off."),
    "logprobs": ("true or false", "True returns each answer token's log probability."),
    "top_logprobs": (f"an integer from 0 to {MAX_TOP_LOGPROBS}, with logprobs=true", "Set logprobs=true as well."),
}

# refusals that are about size: InputLimitError (a subclass of the input error) for these
_SIZE_FIELDS = frozenset({"stop", "logit_bias"})


class SamplingParams(BaseModel):
    """How one request decodes. Defaults: greedy, 256 new tokens, no penalties, no logprobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(256, ge=1, strict=True)
    do_sample: bool = Field(False, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """Sampling temperature; 0 (with `do_sample` unset or False) is greedy decoding."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """Drop tokens whose probability is under `min_p` times the likeliest one's (sampling only)."""
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    """transformers' / vLLM's multiplicative penalty on tokens the answer already holds."""
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stop: tuple[str, ...] = Field((), max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=0, lt=2**63, strict=True)
    min_tokens: int = Field(0, ge=0, strict=True)
    """Tokens the answer has at least: end-of-sequence tokens are held off until then (stop strings still cut)."""
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)

    @field_validator("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
            raise ValueError("not a number")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        if value is None:
            return ()
        stops = (value,) if isinstance(value, str) else value
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise ValueError("not strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError("too long")
        return tuple(stops)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _biases(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ValueError("not a map")
        out: dict[int, float] = {}
        for key, bias in value.items():
            token = token_id(key)
            if token is None:
                raise ValueError(f"key {key!r} is not a token id")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias {bias!r} of {key!r} is out of range")
            out[token] = float(bias)
        return out

    @model_validator(mode="after")
    def _together(self) -> SamplingParams:
        if self.do_sample and self.temperature == 0:
            raise _field_error(
                "temperature", 0,
                "asks for greedy decoding while do_sample=True asks for sampling. Set a temperature above 0 "
                "to sample, or leave do_sample off for greedy decoding.",
            )
        if self.min_tokens > self.max_new_tokens:
            raise _field_error(
                "min_tokens", self.min_tokens, f"is more than max_new_tokens ({self.max_new_tokens}). Lower it, or raise max_new_tokens."
            )
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise _field_error("top_logprobs", self.top_logprobs, "needs logprobs=true. Set it too.")
        return self

    @classmethod
    def build(cls, **options: Any) -> SamplingParams:
        """The params `options` describe (None means the default), or `SafeCoDeInputError` naming the
        first bad field, its value and the fix; its `param` is the field."""
        given = {k: v for k, v in options.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise input_error(exc, given) from None

    # -- what decoding reads ------------------------------------------------------------------

    @property
    def sampled(self) -> bool:
        """Tokens are drawn (not the argmax): do_sample with a temperature above 0 (or none: 1)."""
        return self.do_sample and self.temperature != 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias) or self.repetition_penalty not in (None, 1.0)


def sampling_params(given: SamplingParams | None, options: Mapping[str, Any]) -> SamplingParams:
    """`given`, or the params that keyword `options` describe (None values left out); not both."""
    named = {k: v for k, v in options.items() if v is not None}
    if given is None:
        return SamplingParams.build(**named)
    if not isinstance(given, SamplingParams):
        raise SafeCoDeInputError(f"`sampling` must be a SamplingParams; got a {type(given).__name__}.")
    if named:
        raise SafeCoDeInputError(
            f"Give the sampling options in `sampling` or as keyword arguments, not both (got {sorted(named)} too)."
        )
    return given


def token_id(key: Any) -> int | None:
    """A `logit_bias` key as a token id: an int, or a string of at most 19 ASCII digits (JSON makes
    keys strings; "²", "٣" and 5000-digit strings are not ids, and `int()` would raise or work for
    minutes on them). None when it is neither."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str):
        digits = key.strip()
        if 0 < len(digits) <= 19 and digits.isascii() and digits.isdigit():
            return int(digits)
    return None


# pydantic's error types -> OpenAI's codes for the same problem
_OPENAI_CODES = {
    "extra_forbidden": "unknown_parameter",
    "missing": "missing_required_parameter",
    "too_short": "empty_array",
    "greater_than": "below_min_value",
    "greater_than_equal": "below_min_value",
    "less_than": "above_max_value",
    "less_than_equal": "above_max_value",
    "literal_error": "invalid_value",
    "enum": "invalid_value",
    "value_error": "invalid_value",
}


def openai_code(kind: str, ctx: Mapping[str, Any]) -> str:
    """OpenAI's error code for a pydantic error of type `kind` (`ctx`: its limits):
    `integer_above_max_value`, `decimal_below_min_value`, `unknown_parameter`, `invalid_type`, ..."""
    code = _OPENAI_CODES.get(kind)
    if code is None:
        return "invalid_type" if kind.endswith(("_type", "_parsing")) else "invalid_value"
    if code.endswith(("min_value", "max_value")):
        limit = next((v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le")), None)
        return ("integer_" if isinstance(limit, int) and not isinstance(limit, bool) else "decimal_") + code
    return code


class _FieldError(ValueError):
    def __init__(self, name: str, value: Any, problem: str) -> None:
        super().__init__(problem)
        self.name, self.value, self.problem = name, value, problem


def _field_error(name: str, value: Any, problem: str) -> _FieldError:
    return _FieldError(name, value, problem)


def input_error(exc: ValidationError, given: Mapping[str, Any]) -> SafeCoDeInputError:
    """pydantic's error as the library's: `` `field` (=value) must be ... fix``, with `param` set."""
    first = exc.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        error = SafeCoDeInputError(f"`{cause.name}` (={cause.value!r}) {cause.problem}")
        error.param = cause.name
        return error
    name = str(first["loc"][0]) if first["loc"] else "?"
    if first["type"] == "extra_forbidden":
        close = did_you_mean(name, list(LIMITS))
        error = SafeCoDeInputError(
            f"Unknown sampling option `{name}`" + (f" (did you mean `{close}`?)" if close else "")
            + f". Valid: {sorted(LIMITS)}."
        )
    else:
        words, fix = LIMITS.get(name, ("valid", ""))
        size = first["type"] == "too_long" or str(first.get("ctx", {}).get("error")) == "too long"
        kind = InputLimitError if name in _SIZE_FIELDS and size else SafeCoDeInputError
        error = kind(f"`{name}` (={given.get(name)!r}) must be {words}. {fix}".rstrip())
    error.param = name
    error.code = openai_code(first["type"], first.get("ctx") or {})
    return error
