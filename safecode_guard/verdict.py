"""The judge's answer: a frozen `Verdict`, and the rule that turns a score into a label."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Label", "Verdict", "label_from_score"]

Label = Literal["safe", "unsafe"]


def label_from_score(unsafe_score: float, threshold: float) -> Label:
    """The verdict rule of SPEC section 3: unsafe when `unsafe_score >= threshold`."""
    return "unsafe" if unsafe_score >= threshold else "safe"


class Verdict(BaseModel):
    """A scene-level safety verdict for one request in its visual context."""

    model_config = ConfigDict(frozen=True)

    label: Label
    """"safe" or "unsafe"."""
    unsafe_score: float | None = Field(None, ge=0.0, le=1.0)
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
    latency_s: float = 0.0
    """Seconds the judge took."""

    @property
    def unsafe(self) -> bool:
        return self.label == "unsafe"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()
