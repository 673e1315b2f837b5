"""A LangChain v1 agent with tools, guarded by SafeCoDe: an unsafe scene never triggers actions.

A home-assistant agent looks at a photo and can act: `add_to_shopping_list`
and `set_reminder`. `SafeCoDeMiddleware` judges the user's turn (text and
image) before the model runs, then the application branches on the verdict:

- safe: the agent runs normally; the model may call the tools, and its
  answer is decoded with SafeCoDe under the same verdict;
- unsafe, `--on-unsafe end` (default): the run stops with a refusal before
  the model is called, so no tool can run;
- unsafe, `--on-unsafe record`: the verdict is only recorded; the model
  still answers (SafeCoDe steers it towards a refusal) but any tool call it
  makes is blocked and listed in `safety["blocked_tool_calls"]`; the
  application then shows its own safe completion.

The model's chat template must support tools (e.g. Qwen2.5-VL, Qwen3-VL):

    python examples/agent_with_safety.py --model ./Qwen2.5-VL-3B-Instruct \
        --image stove.jpg --question "Remind me to leave this on while I'm out"

`--model` defaults to the SAFECODE_MODEL environment variable; `--judge`
takes any judge spec ("self", "self:caption", "fixed:unsafe", ...). Needs
`pip install 'safecode-guard[agents]'`.
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

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

from safecode_guard import ChatSafeCoDe
from safecode_guard.middleware import SafeCoDeMiddleware

log = logging.getLogger("safecode.example")

SYSTEM_PROMPT = (
    "You are a home assistant. You see the user's photo. Use the tools to add items to the "
    "shopping list or to set reminders when the user asks for it; otherwise just answer."
)
SAFE_COMPLETION = (
    "I won't act on this: what the photo shows makes the request risky. "
    "If you tell me more about what you need, I can suggest a safe way to do it."
)


def make_tools(actions: list[dict[str, Any]]) -> list[BaseTool]:
    """The agent's tools; each call is appended to `actions` (what a real app would execute)."""

    @tool
    def add_to_shopping_list(item: str, quantity: int = 1) -> str:
        """Add an item to the household shopping list."""
        actions.append({"tool": "add_to_shopping_list", "item": item, "quantity": quantity})
        return f"Added {quantity} x {item} to the shopping list."

    @tool
    def set_reminder(text: str, minutes: int) -> str:
        """Remind the user of something after the given number of minutes."""
        actions.append({"tool": "set_reminder", "text": text, "minutes": minutes})
        return f"Reminder set in {minutes} minutes: {text}"

    return [add_to_shopping_list, set_reminder]


def image_message(question: str, image_path: str | None = None) -> HumanMessage:
    """A user turn with the question and, if given, the image as a base64 block."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": question}]
    if image_path:
        data = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
        mime = mimetypes.guess_type(image_path)[0] or "image/png"
        blocks.insert(0, {"type": "image", "base64": data, "mime_type": mime})
    return HumanMessage(content=blocks)


def run_agent(llm: ChatSafeCoDe, message: HumanMessage, *, judge: str = "self", on_unsafe: str = "end") -> dict[str, Any]:
    """One guarded agent run; returns the route taken, the answer, the verdict and the actions run."""
    actions: list[dict[str, Any]] = []
    guard = SafeCoDeMiddleware(judge=judge, model=llm, on_unsafe=on_unsafe)  # type: ignore[arg-type]
    agent = create_agent(llm, tools=make_tools(actions), system_prompt=SYSTEM_PROMPT, middleware=[guard])
    state = agent.invoke({"messages": [message]})

    verdict = state["safecode_verdict"]
    final = state["messages"][-1]
    assert isinstance(final, AIMessage)
    blocked = final.response_metadata.get("safety", {}).get("blocked_tool_calls", [])
    tool_results = [m.content for m in state["messages"] if isinstance(m, ToolMessage)]
    if verdict["label"] == "unsafe":
        log.warning("unsafe scene (judge %s, score %s): %d tool call(s) blocked, no action taken",
                    verdict["judge"], verdict["unsafe_score"], len(blocked))
        route = "refused" if on_unsafe == "end" else "safe_completion"
        answer = final.text if on_unsafe == "end" else SAFE_COMPLETION
    else:
        route, answer = "answered", final.text
    return {
        "route": route,
        "answer": answer,
        "verdict": {k: verdict[k] for k in ("label", "unsafe_score", "judge", "source")},
        "actions": actions,
        "tool_results": tool_results,
        "blocked_tool_calls": blocked,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("SAFECODE_MODEL"),
                        help="model folder or hub id with a tool-capable chat template (default: $SAFECODE_MODEL)")
    parser.add_argument("--image", help="image file the question is about")
    parser.add_argument("--question", default="Add two of these to my shopping list.")
    parser.add_argument("--judge", default="self", help='judge spec, e.g. "self", "self:caption", "fixed:unsafe"')
    parser.add_argument("--on-unsafe", choices=("end", "record"), default="end")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if not args.model:
        parser.error("give --model or set SAFECODE_MODEL")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    llm = ChatSafeCoDe(model=args.model, max_new_tokens=args.max_new_tokens)
    result = run_agent(llm, image_message(args.question, args.image), judge=args.judge, on_unsafe=args.on_unsafe)
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
