"""The local model judges itself (`SelfJudge`), and a `ChatSafeCoDe` given as a judge (`ChatSafeCoDeJudge`)."""

from __future__ import annotations

import threading
from typing import Any, Literal

import torch

from ..engine.loading import public_name
from ..errors import SafeCoDeInputError
from ..verdict import Verdict, label_from_score
from .prompts import CAPTION_PROMPT, user_turn, verdict_prompt
from .request import JudgeRequest
from .scoring import cached_label_token_ids, unsafe_probability
from .view import DEFAULT_MAX_TRANSCRIPT_CHARS, check_transcript_budget, judge_view

__all__ = [
    "NEAR_THRESHOLD",
    "ChatSafeCoDeJudge",
    "SelfJudge",
]


#: A self-judge score this close to the threshold is recomputed from a prefill of its own.
NEAR_THRESHOLD = 1e-4


def _takes_exact(engine: Any) -> bool:
    import inspect

    try:
        return "exact" in inspect.signature(engine.next_token_logits).parameters
    except (TypeError, ValueError):
        return False


class SelfJudge:
    """The local model judges the request itself, through its engine.

    Uses only `engine.tokenizer`, `engine.next_token_logits(messages) -> (V,)`
    and, in caption mode, `engine.plain_text(messages, max_new_tokens=...)`.

    - `direct`: one `next_token_logits` call on a user turn holding every image
      and the verdict prompt; score = `unsafe_probability` over the label tokens.
    - `caption` (paper-faithful): `plain_text` captions the images, then a
      text-only verdict prompt over request + caption is scored the same way.
      Without images the captioning step is skipped.

    Both prompts hold the conversation as `judge_view` renders it, within
    `max_transcript_chars` characters (default `DEFAULT_MAX_TRANSCRIPT_CHARS`).

    `make_judge("self")` returns an unbound judge; the engine binds it with
    `judge.bind(engine)` (which checks the tokenizer's label tokens up front).
    """

    def __init__(
        self,
        mode: Literal["direct", "caption"] = "direct",
        engine: Any = None,
        *,
        caption_max_new_tokens: int = 64,
        max_transcript_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS,
    ) -> None:
        if mode not in ("direct", "caption"):
            raise SafeCoDeInputError(
                f"SelfJudge mode {mode!r} is unknown. Use mode='direct' (one forward pass) or "
                "mode='caption' (caption first, as in the paper)."
            )
        if not isinstance(caption_max_new_tokens, int) or caption_max_new_tokens < 1:
            raise SafeCoDeInputError(
                f"`caption_max_new_tokens` (={caption_max_new_tokens!r}) must be a positive integer, e.g. 64."
            )
        self.mode: Literal["direct", "caption"] = mode
        self.caption_max_new_tokens = caption_max_new_tokens
        self.max_transcript_chars = check_transcript_budget(max_transcript_chars)
        self.name = f"self:{mode}"
        self.engine = None
        if engine is not None:
            self._check_engine(engine)
            self.engine = engine

    def bind(self, engine: Any) -> SelfJudge:
        """A copy of this judge bound to `engine` (this one is left unchanged)."""
        return SelfJudge(
            self.mode,
            engine,
            caption_max_new_tokens=self.caption_max_new_tokens,
            max_transcript_chars=self.max_transcript_chars,
        )

    def _check_engine(self, engine: Any) -> None:
        needed = ["next_token_logits", "tokenizer"] + (
            ["plain_text"] if self.mode == "caption" else []
        )
        missing = [n for n in needed if not hasattr(engine, n)]
        if missing:
            raise TypeError(
                f"SelfJudge({self.mode!r}) cannot use a {type(engine).__name__}: it lacks {missing}. "
                "Bind it to a SafeCoDe engine."
            )
        # Fail at construction, not on every request, when the labels are not scorable.
        cached_label_token_ids(engine.tokenizer)

    def __call__(self, request: JudgeRequest) -> Verdict:
        engine = self.engine
        if engine is None:
            raise RuntimeError(
                f"SelfJudge({self.mode!r}) is not bound to a model. SafeCoDe binds judge='self' for "
                "you; to use it directly, call `judge.bind(engine)`."
            )
        safe_ids, unsafe_ids = cached_label_token_ids(engine.tokenizer)
        view = judge_view(request, self.max_transcript_chars)
        caption: str | None = None
        # run_judge calls this in a worker thread, where the caller's grad mode does not apply.
        with torch.inference_mode():
            if self.mode == "caption" and request.images:
                caption = engine.plain_text(
                    user_turn(CAPTION_PROMPT, request.images),
                    max_new_tokens=self.caption_max_new_tokens,
                ).strip()
                prompt = verdict_prompt(
                    view.request,
                    caption=caption,
                    transcript=view.transcript,
                    truncated=view.truncated,
                    tools=view.tools,
                )
                messages = user_turn(prompt)
            elif self.mode == "caption":
                prompt = verdict_prompt(
                    view.request, transcript=view.transcript, truncated=view.truncated, tools=view.tools
                )
                messages = user_turn(prompt)
            else:
                prompt = verdict_prompt(
                    view.request,
                    has_images=bool(request.images),
                    transcript=view.transcript,
                    truncated=view.truncated,
                    tools=view.tools,
                )
                messages = user_turn(prompt, request.images)
            logits = engine.next_token_logits(messages)
            score = unsafe_probability(logits, safe_ids, unsafe_ids)
            if abs(score - request.threshold) < NEAR_THRESHOLD and _takes_exact(engine):
                # Concurrent judge passes are prefilled as one padded batch, which may move the
                # score in its last digits. So close to the threshold that could flip the label:
                # score it again alone, so the verdict never depends on other requests.
                score = unsafe_probability(engine.next_token_logits(messages, exact=True), safe_ids, unsafe_ids)
        return Verdict(
            label=label_from_score(score, request.threshold),
            unsafe_score=score,
            caption=caption,
            judge=self.name,
            transcript_truncated=view.truncated,
        )

    def __repr__(self) -> str:
        bound = "bound" if self.engine is not None else "unbound"
        return f"SelfJudge({self.mode!r}, {bound})"


class ChatSafeCoDeJudge:
    """A `ChatSafeCoDe` given as a judge: its model judges with a self judge, unsteered.

    Asking a `ChatSafeCoDe` for a verdict as a chat model would steer the
    verdict itself (its answer opens with a refusal under an unsafe verdict of
    its own judge), so `make_judge(chat_safecode)` returns this instead: a
    `SelfJudge` on the chat model's engine, in the mode of the chat model's own
    judge when that is a self judge ("self:caption" -> caption), else direct.
    The engine is loaded on the first verdict, never at construction.
    """

    def __init__(self, chat_model: Any) -> None:
        spec = getattr(chat_model, "judge", "self")
        if isinstance(spec, SelfJudge):
            template = SelfJudge(
                spec.mode,
                caption_max_new_tokens=spec.caption_max_new_tokens,
                max_transcript_chars=spec.max_transcript_chars,
            )
        elif isinstance(spec, str) and spec.strip().lower() == "self:caption":
            template = SelfJudge("caption")
        else:
            template = SelfJudge("direct")
        self.chat_model = chat_model
        self._template = template
        self._bound: SelfJudge | None = None
        self._lock = threading.Lock()
        model = getattr(chat_model, "model", None)
        shown = public_name(model) if isinstance(model, str) else type(chat_model).__name__
        self.name = f"self:{template.mode}@{shown}"  # verdicts travel: never a local path

    def _judge(self) -> SelfJudge:
        engine = self.chat_model.engine  # loads the model on first use
        with self._lock:
            if self._bound is None or self._bound.engine is not engine:
                self._bound = self._template.bind(engine)
            return self._bound

    def __call__(self, request: JudgeRequest) -> Verdict:
        return self._judge()(request).model_copy(update={"judge": self.name})

    def __repr__(self) -> str:
        return f"ChatSafeCoDeJudge({self.chat_model.model!r}, mode={self._template.mode!r})"
