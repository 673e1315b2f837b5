"""Route a LangChain chain on SafeCoDe's safety verdict.

The model answers a question about an image. A `RunnableBranch` then reads
`response_metadata["safety"]["verdict"]`:

- "unsafe": log it and return a safe completion (a fixed, helpful reply)
  instead of the model's text;
- "safe": continue the chain (here: parse the text and package it with
  the verdict; in your app, the next step of your pipeline).

Run it against any local image-text-to-text model:

    python examples/chain_branch_on_verdict.py --model ./llava-1.5-7b-hf \
        --image cliff.jpg --question "How do I run faster here?"

`--model` defaults to the SAFECODE_MODEL environment variable; `--judge`
takes any judge spec ("self", "self:caption", "fixed:unsafe", ...).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import mimetypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnableParallel

from safecode_guard import ChatSafeCoDe

log = logging.getLogger("safecode.example")

SAFE_COMPLETION = (
    "I can't help with that as asked: it looks risky in this scene. "
    "Tell me more about what you want to achieve and I can suggest a safer way."
)


def image_message(question: str, image_path: str | None = None) -> HumanMessage:
    """A user turn with the question and, if given, the image as a base64 block."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image_path:
        data = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
        mime = mimetypes.guess_type(image_path)[0] or "image/png"
        blocks.insert(0, {"type": "image", "base64": data, "mime_type": mime})
    return HumanMessage(content=blocks)


def is_unsafe(message: AIMessage) -> bool:
    return message.response_metadata["safety"]["verdict"] == "unsafe"


def safe_completion(message: AIMessage) -> dict[str, Any]:
    """The unsafe branch: keep the model's text out, say why in the log."""
    safety = message.response_metadata["safety"]
    log.warning(
        "unsafe scene (judge %s, score %s, source %s): returning the safe completion",
        safety["judge"], safety["unsafe_score"], safety["source"],
    )
    return {"route": "safe_completion", "answer": SAFE_COMPLETION, "safety": safety}


def build_chain(llm: ChatSafeCoDe) -> Runnable:
    """`llm`, then a branch on the verdict. Input: a list of messages; output: a dict."""
    answered = RunnableParallel(
        answer=StrOutputParser(),
        safety=RunnableLambda(lambda m: m.response_metadata["safety"]),
    ) | RunnableLambda(lambda d: {"route": "answered", **d})
    return llm | RunnableBranch((is_unsafe, RunnableLambda(safe_completion)), answered)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("SAFECODE_MODEL"),
                        help="model folder or hub id (default: $SAFECODE_MODEL)")
    parser.add_argument("--image", help="image file to ask about")
    parser.add_argument("--question", default="How do I run faster here?")
    parser.add_argument("--judge", default="self", help='judge spec, e.g. "self", "self:caption", "fixed:unsafe"')
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give --model or set SAFECODE_MODEL")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    llm = ChatSafeCoDe(model=args.model, judge=args.judge, max_new_tokens=args.max_new_tokens)
    result = build_chain(llm).invoke([image_message(args.question, args.image)])
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
