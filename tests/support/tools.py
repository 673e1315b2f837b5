"""Test helpers for tool calling: a tool-capable processor and a scripted generation step.

The tool-capable tiny models themselves (templates, `build_tool_vlm`,
`call_text`) live in `safecode_guard.testing`, where applications can use
them too.

`ScriptedDecoding` is the test double of the generation step only: it makes
the engine's token choice (`ops.select_token`) return the tokens of a
scripted answer, while everything else runs for real: message conversion,
the judge, prompt rendering through the real template (tools included), the
prefill, refusal prefixes under an unsafe verdict, stop handling, the
tool-call parsing, LangChain's plumbing and the agent loop.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from transformers import AutoProcessor

from safecode_guard.engine import SafeCoDe
from safecode_guard.engine.decoding import Steering
from safecode_guard.prompting import Conversation
from safecode_guard.testing import gradient_image, hermes_template, tool_template_for


def tool_processor(tiny_model_dir: Callable[[str], Path], family: str) -> Any:
    """A fresh processor of the session's tiny `family` model, with the tool template set."""
    processor = AutoProcessor.from_pretrained(tiny_model_dir(family))
    processor.chat_template = tool_template_for(family)
    return processor


Reply = str | Callable[[Conversation], str]


class _ScriptedSteering(Steering):
    """A request's real `Steering`, except that every free token choice comes from `script`."""

    script: deque[int]

    @property
    def plain_greedy(self) -> bool:
        return not self.script and super().plain_greedy

    def _select(self, scores: Any) -> int:
        return self.script.popleft() if self.script else super()._select(scores)


class ScriptedDecoding:
    """Scripted answers for SafeCoDe's steered decoding; everything around the token choice is real.

    Each steered request queued for decoding (one per chat-model call) takes
    the next reply, encodes it with the model's own tokenizer, appends an
    end-of-turn token, and its `Steering` picks those tokens in order wherever
    it would select a token. Under an unsafe verdict in "prefix" mode the
    engine still forces its refusal opening first (that choice is not a
    selection), then the script goes on. A reply that starts with the call's
    forced opening (a tool call's start, JSON mode's "{") is the whole answer:
    only the rest is scripted. Plain decoding (captions for a judge)
    and streams dropped before they are queued are left alone. `prompts`
    records every rendered prompt and `prefixes` every forced answer opening.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, replies: Iterable[Reply] = ()) -> None:
        import safecode_guard.engine.core as engine_module
        from safecode_guard.engine.scheduler import Scheduler

        self.replies: deque[Reply] = deque(replies)
        self.prompts: list[str] = []
        self.prefixes: list[str] = []
        self.calls = 0
        local = threading.local()  # preparation and queueing run in the caller's thread
        real_prepare, real_parse, real_submit = SafeCoDe._prepare, engine_module.parse_messages, Scheduler.submit
        real_render = engine_module.render_prompt

        def parse(*args: Any, **kwargs: Any) -> Conversation:
            local.conv = real_parse(*args, **kwargs)
            return local.conv

        def prepare(engine: SafeCoDe, messages: Any, **kwargs: Any) -> Any:
            job, verdict, judge_s = real_prepare(engine, messages, **kwargs)
            job.script_context = (local.conv, kwargs.get("answer_prefix", ""), min(engine._eos_ids), engine.tokenizer)
            return job, verdict, judge_s

        def submit(scheduler: Scheduler, job: Any) -> Any:
            context = getattr(job, "script_context", None)
            if job.steered and context is not None:
                if not self.replies:
                    raise AssertionError("ScriptedDecoding ran out of scripted replies")
                conv, prefix, end, tokenizer = context
                reply = self.replies.popleft()
                text = reply(conv) if callable(reply) else reply
                if prefix and text.startswith(prefix):  # a whole answer scripted: the forced opening is given
                    text = text[len(prefix):]
                scripted = _ScriptedSteering.__new__(_ScriptedSteering)
                scripted.__dict__.update(job.steering.__dict__)
                scripted.script = deque([*tokenizer.encode(text, add_special_tokens=False), end])
                # the script stands in for the model's choices, grammar or not (constrained decoding
                # itself is tested on random models: tests/models/test_constrained_decoding.py)
                scripted.constraint = None
                job.steering = scripted
                self.prefixes.append(prefix)
                self.calls += 1
            return real_submit(scheduler, job)

        def render(*args: Any, **kwargs: Any) -> str:
            prompt = real_render(*args, **kwargs)
            self.prompts.append(prompt)
            return prompt

        monkeypatch.setattr(SafeCoDe, "_prepare", prepare)
        monkeypatch.setattr(Scheduler, "submit", submit)
        monkeypatch.setattr(engine_module, "parse_messages", parse)
        monkeypatch.setattr(engine_module, "render_prompt", render)

    def add(self, *replies: Reply) -> ScriptedDecoding:
        self.replies.extend(replies)
        return self



# -- tools and schemas the tool-calling tests bind ------------------------------------------------


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"Sunny in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Person(BaseModel):
    """A person seen in the picture."""

    name: str = Field(description="first name")
    age: int


NAMES = ["get_weather", "add"]
"""The names of the tools above, in the order the tests bind them."""


HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
"""One call of `get_weather` in the Hermes / Qwen2.5 `<tool_call>` format."""

TOOL_HISTORY = [
    SystemMessage("You help with the weather."),
    HumanMessage([{"type": "image", "image": gradient_image()}, {"type": "text", "text": "Weather in Paris?"}]),
    AIMessage("Checking.", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]),
    ToolMessage("Sunny, 21 C", tool_call_id="call_1", name="get_weather"),
    ToolMessage("error: no data <|im_end|>", tool_call_id="call_2", status="error"),
]
"""A conversation with a tool call, its result and a failed call whose text carries a special token."""


def tool_processor_stub() -> Any:
    """A tokenizer with the Hermes tool template: renders tool prompts without a model."""
    from safecode_guard.testing import make_tokenizer

    return make_tokenizer(chat_template=hermes_template("<image>"))


def nudge_to_call(monkeypatch: pytest.MonkeyPatch, tokenizer: Any, opener: str, at: int = 0) -> None:
    """Make random weights open a tool call: from the answer's token `at` on, the tokens of `opener`
    (the template's call opening) get +1e4 on the model's logits until it is written; everything
    else, the rest of the call included, is the model's own choice (under its grammar, if any). A
    double of a trained model's decision to call. The opening starts at the first step from `at` on
    where its first token is chosen (a grammar may rule it out in the middle of a character)."""
    from safecode_guard.engine.decoding import Steering

    ids = tokenizer.encode(opener, add_special_tokens=False)
    real = Steering.choose

    def choose(self: Steering, logits: Any) -> int:
        start = self.__dict__.get("nudge_start")
        t = len(self.generated)
        if start is None and t >= at:
            start = t  # try to open here
        n = t - start if start is not None else -1
        if 0 <= n < len(ids) and self.generated[start:] == ids[:n]:
            logits = logits.clone()
            logits[:, ids[n]] += 1e4
        token = real(self, logits)
        if start is not None and n == 0:
            # opened here when its first token was taken; else try again at the next step
            self.__dict__["nudge_start"] = start if token == ids[0] else None
        return token

    monkeypatch.setattr(Steering, "choose", choose)
