"""Any LangChain chat model as a judge (`ChatModelJudge`): caption, then a decision."""

from __future__ import annotations

import base64
import io
import sys
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..errors import InvalidVerdictError, SafeCoDeInputError
from ..verdict import Verdict
from .parsing import parse_verdict_text
from .prompts import CAPTION_PROMPT, CHAT_ENDING, verdict_prompt
from .request import JudgeRequest
from .view import DEFAULT_MAX_TRANSCRIPT_CHARS, check_transcript_budget, clip, judge_view

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

__all__ = [
    "ChatModelJudge",
    "chat_judge",
    "is_chat_model",
]


def is_chat_model(obj: Any) -> bool:
    """Whether `obj` is a LangChain `BaseChatModel`, without importing LangChain.

    The engine (and the HTTP server through it) imports the judges, and must not
    load `langchain_core` for that; an object can only be a LangChain chat model
    once LangChain is loaded, so the check looks there.
    """
    models = sys.modules.get("langchain_core.language_models")
    return models is not None and isinstance(obj, models.BaseChatModel)


def _png_block(image: Image.Image) -> dict[str, Any]:
    """A LangChain v1 image content block holding `image` as base64 PNG."""
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {
        "type": "image",
        "base64": base64.b64encode(buf.getvalue()).decode("ascii"),
        "mime_type": "image/png",
    }


def _message_text(message: Any) -> str:
    if isinstance(message, str):
        return message
    return str(message.text)


class ChatModelJudge:
    """Any LangChain chat model as judge: caption the images, then ask for a decision.

    Two calls: (1) when there are images, the images as base64 PNG blocks plus
    `CAPTION_PROMPT`; (2) a text-only verdict prompt over the conversation
    (`judge_view`, within `max_transcript_chars`), the request and the caption
    that asks for a final `Decision: safe|unsafe` line, parsed by
    `parse_verdict_text`. An answer without an unambiguous label raises, so
    `run_judge` applies `on_judge_error`. (A `ChatSafeCoDe` is not a chat judge:
    `make_judge` turns it into a `ChatSafeCoDeJudge`.)
    """

    def __init__(
        self,
        chat_model: BaseChatModel,
        name: str | None = None,
        *,
        max_transcript_chars: int = DEFAULT_MAX_TRANSCRIPT_CHARS,
    ) -> None:
        if not is_chat_model(chat_model):
            raise SafeCoDeInputError(
                f"ChatModelJudge needs a LangChain BaseChatModel, got a {type(chat_model).__name__}. "
                "Use e.g. langchain.chat_models.init_chat_model(...), or make_judge('chat:<provider>:<model>')."
            )
        self.chat_model = chat_model
        self.max_transcript_chars = check_transcript_budget(max_transcript_chars)
        model_id = next(
            (
                v
                for k in ("model_name", "model", "model_id")
                if isinstance(v := getattr(chat_model, k, None), str) and v
            ),
            None,
        )
        self.name = name or f"chat:{model_id or chat_model._llm_type}"

    def __call__(self, request: JudgeRequest) -> Verdict:
        caption: str | None = None
        if request.images:
            blocks = [
                {"type": "text", "text": CAPTION_PROMPT},
                *(_png_block(i) for i in request.images),
            ]
            caption = _message_text(self.chat_model.invoke([{"role": "user", "content": blocks}])).strip()
            # another model's caption has no token limit of ours: bound it like the conversation
            caption, _ = clip(caption, self.max_transcript_chars // 2)
        view = judge_view(request, self.max_transcript_chars)
        prompt = verdict_prompt(
            view.request,
            caption=caption,
            ending=CHAT_ENDING,
            transcript=view.transcript,
            truncated=view.truncated,
            tools=view.tools,
        )
        answer = _message_text(self.chat_model.invoke([{"role": "user", "content": prompt}]))
        label = parse_verdict_text(answer)
        if label is None:
            raise InvalidVerdictError(
                f"could not find 'safe' or 'unsafe' as an unambiguous decision in the judge's answer "
                f"{answer[:200]!r}"
            )
        return Verdict(
            label=label, caption=caption, judge=self.name, transcript_truncated=view.truncated
        )

    def __repr__(self) -> str:
        return f"ChatModelJudge({type(self.chat_model).__name__}, name={self.name!r})"


def chat_judge(provider: str, model: str, spec: str) -> ChatModelJudge:
    try:
        from langchain.chat_models import init_chat_model
    except ImportError as exc:
        raise ImportError(
            f"The judge spec {spec!r} needs the `langchain` package. Install it with "
            "`pip install safecode-guard[agents]` (plus the provider's package, e.g. langchain-openai)."
        ) from exc
    try:
        chat_model = init_chat_model(model, model_provider=provider)
    except ImportError as exc:
        raise ImportError(f"Cannot build the chat judge {spec!r}: {exc}") from exc
    except ValueError as exc:
        raise SafeCoDeInputError(
            f"Cannot build the chat judge {spec!r}: {exc}\nUse 'chat:<provider>:<model>' with a "
            "provider that langchain's init_chat_model knows, e.g. 'chat:openai:gpt-4o'."
        ) from exc
    return ChatModelJudge(chat_model, name=spec)
