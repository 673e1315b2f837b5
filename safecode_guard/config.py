"""Settings: the method's knobs (`SafeCoDeConfig`), the input policy (`InputPolicy`) and
the limits of continuous batching (`BatchingConfig`).

Both validate at construction. A bad value raises pydantic's
`ValidationError` (a `ValueError`) whose message names the field, shows the
value and says what to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_REFUSAL_PHRASES", "BatchingConfig", "InputPolicy", "SafeCoDeConfig", "validated_copy"]

_M = TypeVar("_M", bound=BaseModel)

#: Usual openers of a refusal. Each is tokenized with and without a leading
#: space; only continuations of a refusal already begun are modulated.
DEFAULT_REFUSAL_PHRASES: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "Sorry",
    "I apologize",
    "I cannot",
    "I can't",
    "I'm unable to",
    "I am unable to",
    "I'm not able to",
    "I am not able to",
    "As an AI",
    "I won't",
    "I will not",
)


def validated_copy(settings: _M, update: Mapping[str, Any]) -> _M:
    """`settings` with `update` applied and the result validated as if built anew.

    pydantic's `model_copy(update=...)` skips validation: a `SecretStr` field
    stays a `str`, a range check never runs, a `frozen` model's validators are
    bypassed. Every settings object built from another goes through here.
    """
    return type(settings).model_validate({**settings.model_dump(), **update})


def _in_range(name: str, value: float, lo: float, hi: float, fix: str) -> float:
    if not lo <= value <= hi:
        raise ValueError(f"`{name}` (={value!r}) must be between {lo} and {hi}. {fix}")
    return value


class SafeCoDeConfig(BaseModel):
    """The SafeCoDe method's settings; defaults are the paper's (arXiv 2509.19212)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = 0.3
    """Weight of the noised-image logits in `z_real - alpha * z_noised`."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian pixel noise, on the 0..1 scale."""
    steered_steps: int = 5
    """K: how many first tokens are contrasted and modulated (0 turns SafeCoDe off)."""
    lambda_boost: float = 1.0
    """Logit bonus for refusal tokens when the verdict is unsafe (`unsafe_mode="boost"`)."""
    lambda_supp: float = 1.0
    """Logit penalty for refusal tokens when the verdict is safe."""
    unsafe_mode: Literal["prefix", "boost"] = "prefix"
    """On an unsafe verdict: open the answer with the likeliest refusal phrase, or only boost."""
    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSAL_PHRASES
    """Phrases whose token sequences are boosted (unsafe) or suppressed (safe)."""
    plausibility_beta: float | None = None
    """If set, tokens with real probability below `beta * max` are cut (-inf) in the window."""
    seed: int = 0
    """Seeds the noise generator (one per request). Sampling is seeded per call (`seed=`); a sampled
    call without a seed draws fresh randomness."""
    threshold: float = 0.5
    """The verdict is unsafe when the judge's `unsafe_score >= threshold`."""
    on_judge_error: Literal["unsafe", "safe", "raise"] = "unsafe"
    """What a judge failure becomes: fail closed (default), fail open, or raise `JudgeError`."""
    judge_timeout_s: float | None = 120.0
    """Seconds a judge may take before it counts as failed; None waits forever."""
    on_judge_truncation: Literal["unsafe", "safe", "raise"] = "unsafe"
    """What a "safe" verdict on a truncated view becomes (the conversation did not fit the
    judge's budget, `max_transcript_chars`): "unsafe" (default, fail closed: a fallback
    verdict), "safe" (accept a verdict on the most recent part), or "raise" (`JudgeTruncatedError`)."""
    check_answer: bool = False
    """Also let the judge classify each finished answer (guard judges, `judge="guard:..."`: Llama
    Guard's response classification, ShieldGemma's response prompt). An answer it finds unsafe is
    replaced by `answer_refusal` in `generate`, `invoke` and non-streamed HTTP answers; a stream has
    already sent its text, so its last chunk only flags it (`safety["answer_check"]`). A failed check
    follows `on_judge_error` (an unsafe answer by default)."""
    answer_refusal: str = "I'm sorry, but I can't help with that."
    """What replaces an answer the answer check finds unsafe."""
    close_constrained: bool = True
    """Constrained answers (structured output, JSON mode, tool calls) end within `max_new_tokens`:
    when the budget gets just big enough for the grammar's shortest completion, decoding follows it,
    so the answer closes as a complete, valid instance (`SafeCoDeResult.closed_early`) instead of
    being cut (`finish_reason="length"`, which stays where even that completion cannot fit).
    False: cut at the limit."""

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        return _in_range("alpha", v, 0.0, 10.0, "The paper uses 0.3; 0 disables the contrast.")

    @field_validator("noise_std")
    @classmethod
    def _noise_std(cls, v: float) -> float:
        return _in_range("noise_std", v, 0.0, 10.0, "The paper uses 0.1 (pixels scaled to 0..1).")

    @field_validator("steered_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        return int(_in_range("steered_steps", v, 0, 256, "The paper uses 5; 0 turns SafeCoDe off."))

    @field_validator("lambda_boost", "lambda_supp")
    @classmethod
    def _lambda(cls, v: float, info: Any) -> float:
        return _in_range(info.field_name, v, 0.0, 100.0, "The paper uses 1.0.")

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        return _in_range("threshold", v, 0.0, 1.0, "Use a probability such as 0.5.")

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        return int(_in_range("seed", v, 0, 2**63 - 1, "Use a non-negative integer such as 0."))

    @field_validator("plausibility_beta")
    @classmethod
    def _beta(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError(
                f"`plausibility_beta` (={v!r}) must be in (0, 1] or None. "
                "Use e.g. 0.1 to keep tokens at least a tenth as likely as the best, or None to turn the cut off."
            )
        return v

    @field_validator("judge_timeout_s")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 86400.0:
            raise ValueError(f"`judge_timeout_s` (={v!r}) must be positive seconds or None to wait forever.")
        return v

    @field_validator("answer_refusal")
    @classmethod
    def _answer_refusal(cls, v: str) -> str:
        if not v.strip() or len(v) > 4000:
            raise ValueError(
                f"`answer_refusal` (={v!r:.60}) must be a non-empty text of at most 4000 characters, "
                "e.g. \"I'm sorry, but I can't help with that.\""
            )
        return v

    @field_validator("refusal_phrases", mode="before")
    @classmethod
    def _phrases(cls, v: Any) -> tuple[str, ...]:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple, set, frozenset)):
            raise ValueError(
                f"`refusal_phrases` (={v!r}) must be a list of phrases. "
                f'Use e.g. ["I\'m sorry", "I cannot"].'
            )
        phrases = tuple(v)
        if not phrases:
            raise ValueError("`refusal_phrases` is empty. Give at least one phrase, e.g. [\"I'm sorry\"].")
        for p in phrases:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"`refusal_phrases` holds {p!r}; every phrase must be a non-empty string.")
        return tuple(dict.fromkeys(phrases))  # keep order, drop repeats


class InputPolicy(BaseModel):
    """What requests may contain: images, their sources and sizes, prompt length.

    The image limits bound memory and time before any pixel is decoded: the
    count, the encoded bytes and the header's pixels of every image of a
    request are checked first (per image and summed), then each image is
    decoded and shrunk to at most `max_working_side` pixels on its longer
    side before anything else copies its pixels.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_messages: int = Field(1024, ge=1, le=1_000_000)
    """Most chat messages one request may hold, counted before any message is read."""
    max_content_parts: int = Field(4096, ge=1, le=10_000_000)
    """Most content parts (text and image blocks, a string content counting as one) in all of one
    request's messages, counted before any message is read."""
    max_images: int = Field(8, ge=0, le=256)
    """Most images one request may hold (counted before any is decoded)."""
    max_image_pixels: int = Field(40_000_000, ge=1)
    """Decompression-bomb cap: width * height, read from the header before decoding."""
    max_decode_mb: int = Field(512, ge=16)
    """Most memory decoding one image may take, estimated from its header (format, mode, size,
    JPEG progression) before any pixel is decoded (`safecode_guard.images.decode_memory_estimate`):
    decoders hold the full-size image, and some several copies of it (WEBP about 19 bytes per
    pixel, RGBA about 11, RGB about 7). Over it the image is refused (`ImageInputError`). The
    default lets every format through up to `max_image_pixels` but WEBP (up to about 28 M pixels)."""
    max_image_bytes: int = Field(25_000_000, ge=1)
    """Largest encoded image (bytes, base64 decoded, file or download)."""
    max_total_image_bytes: int = Field(64_000_000, ge=1)
    """Largest sum of the encoded sizes of one request's images, checked before decoding any."""
    max_total_image_pixels: int = Field(160_000_000, ge=1)
    """Largest sum of one request's image sizes (width * height from the headers), checked before
    decoding any: it bounds the decode time of a request (about 4 images at `max_image_pixels`)."""
    max_working_side: int = Field(2048, ge=16, le=16384)
    """Longest side, in pixels, an image is kept at: a larger one is downscaled (aspect kept) as it
    is decoded (JPEGs already inside the decoder), so memory per image after decoding is at most
    about `3 * max_working_side**2` bytes. The engine lowers it further to what its processor needs
    (`safecode_guard.images.image_working_side`)."""
    allow_image_urls: bool = False
    """Fetch http(s) image URLs. Off by default: a guardrail should not reach the network."""
    allow_local_files: bool = False
    """Read images from local paths (and file:// URLs), confined to `local_files_root`."""
    local_files_root: str | None = None
    """Folder local image paths must lie in; required when `allow_local_files` is on. A relative
    folder is made absolute when the policy is built (never taken from the working directory later)."""
    url_timeout_s: float = Field(10.0, gt=0, le=600)
    """Timeout of one image download, in seconds."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Cap on prompt tokens; None means the model's context length minus `max_new_tokens`."""
    max_new_tokens_limit: int = Field(8192, ge=1)
    """Largest `max_new_tokens` a request may ask for."""

    @field_validator("local_files_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip() or "\x00" in v:
            raise ValueError(
                f"`local_files_root` (={v!r}) must name a folder. Use e.g. \"/srv/images\"."
            )
        return os.path.abspath(v)

    @model_validator(mode="after")
    def _root_needed(self) -> InputPolicy:
        if self.allow_local_files and self.local_files_root is None:
            raise ValueError(
                "`allow_local_files=True` needs `local_files_root`: the folder image paths must lie in "
                "(the working directory is never assumed, it may be `/`). Use e.g. "
                "InputPolicy(allow_local_files=True, local_files_root=\"/srv/images\")."
            )
        return self

class BatchingConfig(BaseModel):
    """Limits of the scheduler that batches concurrent requests on one model (see `scheduler`).

    Policy: a request beyond `max_queue` is refused at once (`OverloadedError`);
    one that fits the queue waits for rows and KV budget, first come first
    served; one that could never fit the budget alone is refused at once
    (`InputLimitError`); one past `request_timeout_s` fails (`RequestTimeoutError`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    """Decode concurrent requests together. False: one request at a time (for debugging)."""
    max_batch_rows: int = Field(32, ge=2, le=4096)
    """Most rows in one decode step. A request uses two rows while its window contrasts an image
    (real and noised view), one otherwise."""
    max_queue: int = Field(1024, ge=1)
    """Most requests waiting for a place in the batch; more are refused with `OverloadedError`."""
    kv_cache_budget_mb: float | None = Field(None, gt=0)
    """KV-cache memory the batch may plan for, in MB (projected to every admitted request's
    last token); None: no budget beyond `max_batch_rows`."""
    request_timeout_s: float | None = Field(None, gt=0, le=86400)
    """Seconds one request may take from submission to its last token; None waits forever."""
    gather_ms: float = Field(50.0, ge=0, le=5000)
    """At the start of a burst (nothing decoding), wait up to this long for requests still being
    prepared, so that they are prefilled together and decode without padding. 0 never waits."""
    prefill_chunk_tokens: int | None = Field(512, ge=16)
    """Prefill work done between two decode steps, in prompt tokens summed over rows (a token deep
    into a long prompt counts more: it attends to more context; `adapters.chunk_columns`). Longer
    prompts are prefilled a chunk at a time, so a running stream waits about one chunk and one step
    for its next token. None prefills each prompt whole (a long one then stalls every stream)."""
    image_cache_mb: float = Field(256.0, ge=0)
    """Memory for image features kept after a prefill, so a prompt showing the same images (a
    self judge's, then the answer's real view) skips the vision tower. 0 keeps none."""
