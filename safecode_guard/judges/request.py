"""What a judge is given (`JudgeRequest`), what it is (`Judge`), and the verdict hand-off between a rail and the model."""

from __future__ import annotations

import contextvars
import hashlib
import numbers
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from ..errors import InvalidVerdictError, SafeCoDeInputError, UnsupportedContentError
from ..messages import (
    Conversation,
    Turn,
    canonical_json,
    checked_prefix,
    checked_schema,
    checked_tools,
    read_turns,
)
from ..verdict import Label, Verdict, validated_verdict

__all__ = [
    "Judge",
    "JudgeRequest",
    "JudgeResult",
    "hand_off_verdict",
    "handed_off_verdict",
    "judge_name",
    "request_fingerprint",
]


JudgeResult = Verdict | Label | float
"""What a judge may return: a `Verdict`, a label, or an unsafe probability in [0, 1]."""


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class JudgeRequest:
    """Everything a judge may look at, for one request: what the model reads.

    The engine builds it from the same `Conversation` it renders the model's
    prompt from (`from_conversation`), so the judge sees every turn, every
    image, the text as the chat template joins it, the tools and the answer's
    forced opening.
    """

    images: tuple[Image.Image, ...]
    """Every image of the conversation, in message order (PIL, already loaded).
    Empty with a conversation that holds images: taken from the conversation."""
    request: str
    """Text of the latest user turn."""
    conversation: tuple[dict, ...] = ()
    """The whole Hugging Face chat-format message list (system, user, assistant and
    tool turns, tool calls included), images as PIL."""
    threshold: float = 0.5
    """The verdict is unsafe when the unsafe score is at least this."""
    tools: tuple[dict, ...] = ()
    """Tool definitions the model is given (OpenAI-format function schemas: names,
    descriptions, parameter schemas). A client may write them, so judges read them too."""
    response_schema: dict | None = None
    """A JSON schema the model's answer is held to, if any."""
    answer_prefix: str = ""
    """Text the model's answer is forced to open with (the model reads it as its own words)."""
    turns: tuple[Turn, ...] = field(default=(), init=False, repr=False, compare=False)
    """`conversation` checked and read into `Turn`s (what the built-in judges render)."""

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen into tuples, so a request
        # cannot change under a judge running in another thread.
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "conversation", tuple(self.conversation))
        for i, img in enumerate(self.images):
            if not isinstance(img, Image.Image):
                raise UnsupportedContentError(
                    f"JudgeRequest.images[{i}] is a {type(img).__name__}, not a PIL image. "
                    "Load it first, e.g. with `safecode_guard.images.load_image(value, policy)`."
                )
        if not isinstance(self.request, str):
            raise SafeCoDeInputError(
                f"JudgeRequest.request is a {type(self.request).__name__}; it must be the text "
                "of the latest user turn (a str, possibly empty)."
            )
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, numbers.Real)
            or not 0.0 <= float(self.threshold) <= 1.0
        ):
            raise SafeCoDeInputError(
                f"JudgeRequest.threshold (={self.threshold!r}) must be between 0 and 1. "
                "Use a probability such as 0.5."
            )
        # The same checks as the model's (`Conversation.with_request`), frozen copies kept.
        object.__setattr__(self, "tools", checked_tools(self.tools))
        object.__setattr__(self, "response_schema", checked_schema(self.response_schema))
        checked_prefix(self.answer_prefix)
        turns = read_turns(self.conversation, "conversation")
        object.__setattr__(self, "turns", turns)
        seen = tuple(img for turn in turns for img in turn.images)
        if seen and not self.images:
            object.__setattr__(self, "images", seen)
        elif seen and not _same_images(seen, self.images):
            # A judge shows `images`; the transcript marks the conversation's images by
            # position. Both must be the same list, or an image could go unjudged.
            raise UnsupportedContentError(
                f"JudgeRequest.images ({len(self.images)} images) are not the images of "
                f"`conversation` ({len(seen)}, in message order). Pass the conversation's images in "
                "order (as `JudgeRequest.from_messages` does), or images=() to take them from it."
            )

    @classmethod
    def from_messages(
        cls,
        messages: Sequence[Mapping[str, Any]],
        *,
        threshold: float = 0.5,
        tools: Sequence[Mapping[str, Any]] | None = None,
        response_schema: Mapping[str, Any] | None = None,
    ) -> JudgeRequest:
        """Build a request from Hugging Face chat-format messages whose images are PIL.

        Every turn is kept (system, user, assistant with its `tool_calls`, tool
        results with `name` / `tool_call_id`); images are collected from every
        message in order; `request` is the text of the latest user turn, its
        text parts concatenated (as most chat templates write them; the engine
        uses its own template's joins, `from_conversation`). `tools` and
        `response_schema` are what the model is given besides the messages.
        Load non-PIL image values (bytes, data URLs, paths) with
        `safecode_guard.images.load_image` before calling this.
        """
        turns = read_turns(messages)
        users = [t for t in turns if t.role == "user"]
        return cls(
            images=tuple(img for t in turns for img in t.images),
            request=users[-1].text if users else "",
            conversation=tuple(messages),
            threshold=threshold,
            tools=tuple(tools or ()),
            response_schema=None if response_schema is None else dict(response_schema),
        )

    @classmethod
    def from_conversation(cls, conversation: Conversation, *, threshold: float = 0.5) -> JudgeRequest:
        """The request for `conversation`, the object the model's prompt is rendered from.

        The judge reads its messages with each run of text joined as the
        model's chat template joins it (`conversation.joins`), its images, its
        tools, response schema and answer opening: nothing the model reads is
        left out. The one place a request is made from a conversation.
        """
        return cls(
            images=conversation.images,
            request=conversation.request,
            conversation=conversation.judged_messages(),
            threshold=threshold,
            tools=conversation.tools,
            response_schema=conversation.response_schema,
            answer_prefix=conversation.answer_prefix,
        )


def _same_images(a: Sequence[Image.Image], b: Sequence[Image.Image]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Judge(Protocol):
    """A judge: a name and one call. Return a `Verdict`, a label, or an unsafe score."""

    name: str

    def __call__(self, request: JudgeRequest) -> JudgeResult: ...


# --------------------------------------------------------------------------- hand-off
#
# A rail (NeMo's input rail, say) that judged a request just before the model
# runs can hand its verdict to the model in the same context, so the request is
# judged once. The hand-off rides on a ContextVar (it follows the request
# through asyncio tasks and LangChain's executor threads, never across
# requests) and is used only for exactly the same request and judge.

_HANDED_OFF: contextvars.ContextVar[tuple[str, Verdict] | None] = contextvars.ContextVar(
    "safecode_verdict_hand_off", default=None
)


class _Digest:
    """SHA-256 over typed, length-prefixed fields: no two different field lists feed it the same bytes."""

    def __init__(self, domain: str) -> None:
        self._h = hashlib.sha256()
        self.bytes(b"D", domain.encode())

    def bytes(self, kind: bytes, payload: bytes) -> None:
        self._h.update(kind + struct.pack(">Q", len(payload)) + payload)

    def text(self, value: str | None) -> None:
        # None and "" differ: None has a kind of its own
        self.bytes(b"N", b"") if value is None else self.bytes(b"S", value.encode("utf-8", "surrogatepass"))

    def count(self, n: int) -> None:
        self.bytes(b"C", struct.pack(">Q", n))

    def image(self, image: Image.Image) -> None:
        self.text(image.mode)
        self.bytes(b"Z", struct.pack(">QQ", *image.size))
        palette = image.getpalette() if image.mode in ("P", "PA") else None
        self.bytes(b"P", bytes(palette) if palette is not None else b"-")
        self.text(repr(image.info.get("transparency")))
        self.bytes(b"I", image.tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def request_fingerprint(request: JudgeRequest) -> str:
    """A digest of everything a judge sees: threshold, request text, every image, every turn.

    Injective by construction (up to SHA-256 collisions): each field is written
    with its kind and length, lists with their count, so e.g. a request with a
    1x1 image never meets the same request without it, and ("ab", image, "c")
    never meets ("a", image, "bc"). Text parts count as the model reads them:
    each run of text joined as the chat template joins it (so ("ab", "c") and
    ("a", "bc") under a concatenating template are one request). Images: mode,
    size, palette, transparency and pixels.
    Turns: role, text runs and image parts in order (an image by its position in
    `request.images`, which `JudgeRequest` checks match), tool calls (id, name,
    canonical JSON arguments), tool name and call id. Then the tools, the
    response schema (canonical JSON) and the answer's opening.
    """
    d = _Digest("safecode-guard/judge-request/v3")
    d.text(float(request.threshold).hex())
    d.text(request.request)
    d.count(len(request.images))
    for image in request.images:
        d.image(image)
    d.count(len(request.turns))
    index = 0
    for turn in request.turns:
        d.text(turn.role)
        d.count(len(turn.parts))
        for part in turn.parts:
            if isinstance(part, str):
                d.text(part)
            else:
                d.bytes(b"R", struct.pack(">Q", index))  # the index-th of request.images
                index += 1
        d.count(len(turn.tool_calls))
        for call_id, name, args in turn.tool_calls:
            d.text(call_id)
            d.text(name)
            d.text(args)
        d.text(turn.tool_name)
        d.text(turn.tool_call_id)
    d.count(len(request.tools))
    for tool in request.tools:
        d.text(canonical_json(tool))
    d.text(None if request.response_schema is None else canonical_json(request.response_schema))
    d.text(request.answer_prefix)
    return d.hexdigest()


def hand_off_verdict(request: JudgeRequest, verdict: Verdict) -> None:
    """Offer `verdict` to later SafeCoDe calls in this context that judge the same request.

    The verdict is validated first (`InvalidVerdictError` if it is not a valid one).
    """
    _HANDED_OFF.set((request_fingerprint(request), validated_verdict(verdict)))


def handed_off_verdict(request: JudgeRequest, judge_name: str) -> Verdict | None:
    """The verdict handed off for exactly this request by a judge named `judge_name`, if any.

    Only a judge's own decision is reused (`source="judge"`): a fallback or an
    override is not a judgement of this request to pass along. The verdict is
    validated again (the context variable is reachable from user code); an
    invalid one is ignored, so the request is judged afresh.
    """
    handed = _HANDED_OFF.get()
    if not isinstance(handed, tuple) or len(handed) != 2:
        return None
    fingerprint, offered = handed
    try:
        verdict = validated_verdict(offered)
    except InvalidVerdictError:
        return None
    if verdict.source != "judge" or verdict.judge != judge_name:
        return None
    return verdict if fingerprint == request_fingerprint(request) else None


def judge_name(judge: Any) -> str:
    """The name a judge's verdicts carry: its `name`, else its function name, else its type's."""
    name = getattr(judge, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(judge, "__name__", None) or type(judge).__name__
