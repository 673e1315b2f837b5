"""The judge's answer: a frozen `Verdict`, the rule that turns a score into a label, the
one check every verdict from outside this library goes through (`validated_verdict`), and the
verdict as answer metadata (`safety_metadata`, SPEC section 5)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from .config import SafeCoDeConfig
from .errors import InvalidVerdictError

__all__ = [
    "MAX_CATEGORIES",
    "MAX_CATEGORY_CHARS",
    "InvalidVerdictError",
    "Label",
    "Verdict",
    "answer_check_metadata",
    "label_from_score",
    "safety_metadata",
    "validated_verdict",
]

Label = Literal["safe", "unsafe"]

MAX_CATEGORIES = 64
"""Most categories one verdict may name."""
MAX_CATEGORY_CHARS = 64
"""Longest category name."""


def label_from_score(unsafe_score: float, threshold: float) -> Label:
    """The verdict rule of SPEC section 3: unsafe when `unsafe_score >= threshold`."""
    return "unsafe" if unsafe_score >= threshold else "safe"


class Verdict(BaseModel):
    """A scene-level safety verdict for one request in its visual context.

    Frozen and closed (unknown fields are errors). Pydantic lets code bypass
    validation (`model_construct`, `model_copy(update=...)`), so every verdict
    that comes from outside the library is rebuilt with `validated_verdict`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    label: Label
    """"safe" or "unsafe"."""
    unsafe_score: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    """The judge's probability that the request is unsafe, when it gives one."""
    caption: str | None = None
    """The scene description the judge used, when it made one."""
    judge: str = "unknown"
    """Name of the judge that decided."""
    source: Literal["judge", "fallback", "override"] = "judge"
    """"judge": decided by the judge; "fallback": the judge failed and policy decided;
    "override": the caller fixed the verdict."""
    error: str | None = None
    """Why the judge failed, for fallback verdicts."""
    latency_s: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """Seconds the judge took."""
    transcript_truncated: StrictBool = False
    """True when the conversation was longer than the judge's transcript budget
    (`max_transcript_chars`), so the judge saw only its most recent part (the
    prompt told it so). A verdict on a truncated view may miss harm that sits in
    the omitted, older turns."""
    categories: list[str] = Field(default_factory=list, max_length=MAX_CATEGORIES)
    """The hazard categories the judge found violated: Llama Guard's codes ("S1", "S9"),
    ShieldGemma 2's policy names ("dangerous"). Empty when the verdict is safe, and when
    the judge names none (self, chat and fixed judges, fallbacks)."""

    @field_validator("categories", mode="before")
    @classmethod
    def _categories_list(cls, value: Any) -> Any:
        # a tuple reads as the list it is; a lone string would read as its characters: refused
        if isinstance(value, tuple):
            return list(value)
        return value

    @field_validator("categories")
    @classmethod
    def _category_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or len(name) > MAX_CATEGORY_CHARS or name != name.strip() or not name.isprintable():
                raise ValueError(
                    f"category {name!r:.80} must be a short name such as 'S1' or 'dangerous' "
                    f"(1-{MAX_CATEGORY_CHARS} printable characters, no surrounding spaces)"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"categories {value!r:.120} name a category twice")
        return value

    @model_validator(mode="after")
    def _no_categories_when_safe(self) -> Verdict:
        if self.label == "safe" and self.categories:
            raise ValueError(f"a safe verdict names no violated categories (got {self.categories!r:.120})")
        return self

    @field_validator("unsafe_score", "latency_s", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        # bool is an int to Python, but True/False says nothing about a probability or a duration.
        if isinstance(value, bool):
            raise ValueError(f"must be a number, not the bool {value!r}")
        return value

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def validated_verdict(value: Any) -> Verdict:
    """`value` rebuilt as a fully validated, plain `Verdict`, or `InvalidVerdictError`.

    Accepts a `Verdict` (also one made with `model_construct` or
    `model_copy(update=...)`, which pydantic does not validate, or a subclass)
    or a mapping of `Verdict` fields. Every field is checked again: the label
    must be exactly "safe" or "unsafe", scores and latencies finite and in
    range, no unknown fields. The result is always of class `Verdict` itself,
    so a subclass cannot change what `.unsafe` means.

    Use it wherever a verdict enters from user code: judge results
    (`run_judge` does), `verdict=` overrides, handed-off and recorded verdicts.
    """
    if isinstance(value, Verdict):
        data = dict(vars(value))  # the field values as stored, whatever bypassed validation
        extra = getattr(value, "__pydantic_extra__", None)
        if extra:
            data.update(extra)
    elif isinstance(value, Mapping):
        data = dict(value)
    else:
        raise InvalidVerdictError(
            f"{type(value).__name__} {value!r:.80} is not a verdict. Give a Verdict, e.g. "
            "Verdict(label='unsafe', unsafe_score=0.9, judge='mine'), or a dict of its fields."
        )
    score = data.get("unsafe_score")
    if isinstance(score, float) and not math.isfinite(score):
        # named here because pydantic's message for NaN ("greater than or equal to 0") misleads
        raise InvalidVerdictError(
            f"The verdict's unsafe_score is {score!r}; it must be a finite probability in [0, 1] or None."
        )
    try:
        return Verdict.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'verdict'}={e.get('input')!r:.60}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidVerdictError(
            f"Invalid verdict ({problems}). A verdict needs label 'safe' or 'unsafe' (lower case), "
            "an unsafe_score in [0, 1] or None, latency_s >= 0, categories (short names) only when unsafe, "
            "and only Verdict's own fields; build "
            "it with Verdict(...) rather than model_construct / model_copy(update=...)."
        ) from exc


# --------------------------------------------------------------------------- as answer metadata


def safety_metadata(verdict: Verdict, config: SafeCoDeConfig, refused: bool) -> dict[str, Any]:
    """`response_metadata["safety"]` (SPEC section 5) for one answer."""
    return {
        "verdict": verdict.label,
        "unsafe_score": verdict.unsafe_score,
        "threshold": config.threshold,
        "judge": verdict.judge,
        "source": verdict.source,
        "caption": verdict.caption,
        "error": verdict.error,
        "steered_steps": config.steered_steps,
        "unsafe_mode": config.unsafe_mode,
        "refused": refused,
        # the judge saw only the most recent part of a long conversation (its budget)
        "transcript_truncated": verdict.transcript_truncated,
        # the hazard categories a guard judge found violated ("S1", "dangerous"); empty when safe
        "categories": list(verdict.categories),
    }


def answer_check_metadata(verdict: Verdict, replaced: bool) -> dict[str, Any]:
    """`safety["answer_check"]`: the judge's verdict on the finished answer (`SafeCoDeConfig.check_answer`),
    and whether the answer was replaced by the refusal (never, once streamed: its text was sent)."""
    return {
        "verdict": verdict.label,
        "unsafe_score": verdict.unsafe_score,
        "categories": list(verdict.categories),
        "judge": verdict.judge,
        "source": verdict.source,
        "error": verdict.error,
        "replaced": replaced,
    }
