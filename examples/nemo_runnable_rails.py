"""NeMo Guardrails around `ChatSafeCoDe` in LangChain: a guarded chain, and guarded streaming.

1. `guarded_chain`: `prompt | (RunnableRails(config) | chat)`. The SafeCoDe input
   rail of the shipped config judges each request, image included, before the
   model runs; an unsafe one gets the rail's refusal and the model is never
   called. With `| chat`, `RunnableRails.invoke` returns a plain `AIMessage`
   for an answer: the model's `response_metadata["safety"]` does not survive
   NeMo's plain adapter (a refusal by the rail carries the rail's verdict).
   Its `stream` / `astream` (called on the rails, not on the chain: NeMo
   0.24's `RunnableRails` cannot stream inside `prompt | rails`) yield chunks
   whose `provider_metadata["safety"]` holds it. `RunnableRails(config)`
   alone, whose config builds the model (`engine: safecode`), returns
   answers with `response_metadata["safety"]`; so does `LLMRails.generate`.

2. `streaming_rails` + `stream_answer`: the same input rail plus an output rail
   that NeMo checks on each chunk of the streamed answer. `stream_first: false`
   makes NeMo check a chunk before sending it, so a blocked answer never
   appears, not even in part; with NeMo's default (`stream_first: true`) the
   text goes out first and the block follows it. The output rail here (blocked
   terms) stands in for your own; any action returning a `RailOutcome` and
   taking `**kwargs` works.

Run it (the first run builds the demo model into your cache, about 30 s):

    NEMO_GUARDRAILS_NO_USAGE_STATS=1 python examples/nemo_runnable_rails.py [image.png]

`SAFECODE_MODEL` (a local model folder) and `SAFECODE_JUDGE` (self, fixed:safe,
fixed:unsafe, chat:<provider>:<model>) choose the model and the judge.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# NeMo's telemetry off, before NeMo is imported.
os.environ.setdefault("NEMO_GUARDRAILS_NO_USAGE_STATS", "1")

from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from nemoguardrails import LLMRails, RailsConfig
from nemoguardrails.actions.rail_outcome import RailOutcome
from nemoguardrails.integrations.langchain.runnable_rails import RunnableRails

from safecode_guard import ChatSafeCoDe
from safecode_guard.nemo import JUDGE_ENV, MODEL_ENV, SafeCoDeLLMAdapter, init, resolve_model

#: The shipped Colang 1.0 config: SafeCoDe input rail, passthrough, `engine: safecode`.
SAFECODE_CONFIG = (
    Path(__file__).resolve().parents[1] / "integrations" / "nemoguardrails" / "safecode"
)

STREAMING_YAML = """
passthrough: true
rails:
  input:
    flows:
      - safecode check input   # the shipped rail (its rails.co is loaded below)
  output:
    flows:
      - check blocked terms
    streaming:
      enabled: true
      chunk_size: 16        # tokens per checked chunk
      context_size: 4       # tokens of the previous chunk the rail sees again
      stream_first: false   # check each chunk BEFORE it is sent
"""

OUTPUT_RAIL_CO = """
define flow check blocked terms
  $outcome = execute check_blocked_terms
  if $outcome.is_blocked
    bot refuse to share answer
    stop

define bot refuse to share answer
  "I can't share that answer."
"""


def make_chat(model: str | None = None, judge: str | None = None, **kwargs: Any) -> ChatSafeCoDe:
    """A `ChatSafeCoDe` on `model` (default `$SAFECODE_MODEL`, else the demo model) with `judge`."""
    return ChatSafeCoDe(
        model=resolve_model(model or os.environ.get(MODEL_ENV)),
        judge=judge or os.environ.get(JUDGE_ENV) or "self",
        **kwargs,
    )


def guarded_chain(chat: ChatSafeCoDe, config_path: Path = SAFECODE_CONFIG) -> Runnable:
    """`{"question", "image_url"} -> AIMessage`: a prompt, then the rails around `chat`."""
    prompt = ChatPromptTemplate.from_messages(
        [
            (
                "human",
                [
                    {"type": "text", "text": "{question}"},
                    {"type": "image_url", "image_url": {"url": "{image_url}"}},
                ],
            )
        ]
    )
    # `| chat` makes `chat` the rails' main model; the input rail's self judge shares its engine.
    # (NeMo 0.24 warns that passing a raw LangChain model is deprecated; its docs still show `|`.)
    guardrails = RunnableRails(RailsConfig.from_path(str(config_path))) | chat
    return prompt | guardrails


def stream_guarded(chat: ChatSafeCoDe, question: str, image_url: str, config_path: Path = SAFECODE_CONFIG) -> tuple[str, dict[str, Any] | None]:
    """`(answer, safety)` streamed through the rails: the text of every chunk, and the verdict they carry.

    NeMo 0.24's `RunnableRails` cannot stream as a step after `prompt |`
    (`astream` fails on the prompt's output), so the messages are built
    first and handed to the rails' own `stream`. Each chunk carries the
    model's metadata as an extra attribute, `provider_metadata` (not in
    `response_metadata`, and lost when chunks are added together).
    """
    from langchain_core.messages import HumanMessage

    guardrails = RunnableRails(RailsConfig.from_path(str(config_path))) | chat
    message = HumanMessage(
        content=[{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image_url}}]
    )
    text, safety = "", None
    for chunk in guardrails.stream([message]):
        text += chunk.content
        safety = safety or (getattr(chunk, "provider_metadata", None) or {}).get("safety")
    return text, safety


def blocked_terms_rail(terms: Sequence[str]) -> Any:
    """An output-rail action: block a bot message that contains any of `terms` (case-insensitive)."""
    lowered = [t.lower() for t in terms if t]

    async def check_blocked_terms(context: dict | None = None, **kwargs: Any) -> RailOutcome:
        # `**kwargs`: the streaming path passes extra parameters (llm_task_manager, ...).
        text = str((context or {}).get("bot_message") or "").lower()
        hits = [t for t in lowered if t in text]
        if hits:
            return RailOutcome.block(reason=f"blocked terms: {hits}")
        return RailOutcome.allow()

    return check_blocked_terms


def streaming_rails(
    chat: ChatSafeCoDe, blocked_terms: Sequence[str], config_path: Path = SAFECODE_CONFIG
) -> LLMRails:
    """The shipped input rail plus a streamed output rail (`stream_first: false`), answering with `chat`."""
    config = RailsConfig.from_content(
        yaml_content=STREAMING_YAML,
        colang_content=(config_path / "rails.co").read_text(encoding="utf-8") + OUTPUT_RAIL_CO,
    )
    # SafeCoDeLLMAdapter: NeMo's LangChain adapter with the limits of a request-facing model
    # (requests cannot set `verdict` or `model`; NeMo's own checks are not steered).
    rails = LLMRails(config, llm=SafeCoDeLLMAdapter(chat))
    init(rails)  # the safecode actions; a config folder's config.py does this for you
    rails.register_action(blocked_terms_rail(blocked_terms), name="check_blocked_terms")
    return rails


async def stream_answer(rails: LLMRails, messages: list[dict[str, Any]]) -> list[str]:
    """Every chunk `rails.stream_async` yields. A block arrives as one JSON chunk holding `"error"`."""
    return [chunk async for chunk in rails.stream_async(messages=messages)]


def data_url(path: str) -> str:
    """An image file as a `data:` URL (the form images take in OpenAI-style messages)."""
    suffix = Path(path).suffix.lower().lstrip(".") or "png"
    mime = "jpeg" if suffix == "jpg" else suffix
    return f"data:image/{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def main(argv: Sequence[str]) -> None:
    if argv:
        image_url = data_url(argv[0])
    else:
        from safecode_guard.testing import gradient_image

        buffer = io.BytesIO()
        gradient_image(64, 64).save(buffer, format="PNG")
        image_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    chat = make_chat(max_new_tokens=48)
    question = "How do I run faster here?"

    answer = guarded_chain(chat).invoke({"question": question, "image_url": image_url})
    print("chain answer:", answer.content)
    print("  response_metadata after RunnableRails | chat:", answer.response_metadata or "{} (dropped)")

    text, safety = stream_guarded(chat, question, image_url)
    print("streamed through RunnableRails:", text)
    print("  verdict on the chunks:", safety and safety["verdict"])

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": image_url}},
            ],
        }
    ]
    rails = streaming_rails(chat, blocked_terms=["knife", "weapon"])
    print("streamed chunks:", asyncio.run(stream_answer(rails, messages)))


if __name__ == "__main__":
    main(sys.argv[1:])
