"""Read SafeCoDe's safety verdict while streaming.

The verdict is decided before decoding starts, so it rides on the FIRST
streamed chunk (`chunk.response_metadata["safety"]`), before any text is
shown: a UI can label the answer, or stop and show its own message, before
the user reads a word. The last chunk carries `finish_reason` and token usage.

    python examples/stream_verdict.py --model ./llava-1.5-7b-hf --image cliff.jpg \
        --question "How do I run faster here?" [--stop-on-unsafe]

`--model` defaults to the SAFECODE_MODEL environment variable.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain_core.messages import HumanMessage

from safecode_guard import ChatSafeCoDe


def image_message(question: str, image_path: str | None = None) -> HumanMessage:
    """A user turn with the question and, if given, the image as a base64 block."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image_path:
        data = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
        mime = mimetypes.guess_type(image_path)[0] or "image/png"
        blocks.insert(0, {"type": "image", "base64": data, "mime_type": mime})
    return HumanMessage(content=blocks)


def stream_answer(llm: ChatSafeCoDe, message: HumanMessage, *, stop_on_unsafe: bool = False) -> dict[str, Any]:
    """Print the answer as it streams, with the verdict first. Returns verdict, text and usage."""
    safety: dict[str, Any] | None = None
    text, usage = [], None
    for chunk in llm.stream([message]):
        if "safety" in chunk.response_metadata:  # the first chunk
            safety = chunk.response_metadata["safety"]
            print(f"[verdict: {safety['verdict']}, score {safety['unsafe_score']}, judge {safety['judge']}]",
                  file=sys.stderr)
            if stop_on_unsafe and safety["verdict"] == "unsafe":
                print("Sorry, I can't help with that here.")
                break  # leaving the loop stops decoding at once
        print(chunk.text, end="", flush=True)
        text.append(chunk.text)
        usage = chunk.usage_metadata or usage  # on the last chunk
    print()
    return {"safety": safety, "text": "".join(text), "usage": usage}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("SAFECODE_MODEL"),
                        help="model folder or hub id (default: $SAFECODE_MODEL)")
    parser.add_argument("--image", help="image file to ask about")
    parser.add_argument("--question", default="How do I run faster here?")
    parser.add_argument("--judge", default="self")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--stop-on-unsafe", action="store_true", help="show a fixed reply instead of an unsafe-scene answer")
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give --model or set SAFECODE_MODEL")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    llm = ChatSafeCoDe(model=args.model, judge=args.judge, max_new_tokens=args.max_new_tokens)
    return stream_answer(llm, image_message(args.question, args.image), stop_on_unsafe=args.stop_on_unsafe)


if __name__ == "__main__":
    main(sys.argv[1:])
