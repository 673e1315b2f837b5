"""Test helpers for tool calling: tool-capable chat templates and a scripted generation step.

The tiny models' own templates (`safecode_guard.testing`) have no tool
support, like many real VLM checkpoints. Two real-world tool layouts are
written out here for them:

- `hermes_template`: Qwen2.5 style (`<tools>` in the system turn,
  `<tool_call>{json}</tool_call>` in assistant turns, tool results as
  `<tool_response>` inside a user turn), for the Qwen2.5-VL family;
- `llama_json_template`: Llama 3.1 style (tools listed in the first user
  turn, calls as a bare `{"name": ..., "parameters": ...}` answer, results in
  an `ipython` turn), for the Llava family (a Llama text model).

`ScriptedDecoding` is the test double of the generation step only: it makes
the engine's token choice (`ops.select_token`) return the tokens of a
scripted answer, while everything else runs for real: message conversion,
the judge, prompt rendering through the real template (tools included), the
prefill, refusal prefixes under an unsafe verdict, stop handling, the
tool-call parsing, LangChain's plumbing and the agent loop.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoProcessor

from safecode_guard.decoding import Steering
from safecode_guard.engine import SafeCoDe
from safecode_guard.prompting import Conversation
from safecode_guard.testing import build_tiny_vlm

#: The placeholder each family's processor expands into image tokens.
IMAGE_STRINGS = {"llava": "<image>\n", "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def _content_macro(image_str: str) -> str:
    return (
        "{%- macro show(content) -%}"
        "{%- if content is string -%}{{- content -}}"
        "{%- elif content -%}{%- for part in content -%}"
        "{%- if part.type == 'image' -%}{{- " + json.dumps(image_str) + " -}}"
        "{%- elif part.type == 'text' -%}{{- part.text -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}\n"
    )


def hermes_template(image_str: str) -> str:
    """Qwen2.5's tool-calling ChatML template, with image parts rendered as `image_str`."""
    return _content_macro(image_str) + r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- show(messages[0].content) }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + show(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + show(message.content) + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + show(message.content) }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + show(message.content) + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def llama_json_template(image_str: str) -> str:
    """Llama 3.1's JSON tool-calling template (single calls), with image parts rendered as `image_str`."""
    return _content_macro(image_str) + r"""
{%- if messages[0].role == 'system' %}
    {%- set system_message = show(messages[0].content) %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools is not none %}
    {{- 'Environment: ipython\n' }}
{%- endif %}
{{- system_message + '<|eot_id|>' }}
{%- if tools is not none %}
    {%- set first_user_message = show(messages[0].content) %}
    {%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
    {{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n' }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- '\n\n' }}
    {%- endfor %}
    {{- first_user_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + show(message.content) + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- for tool_call in message.tool_calls %}
            {%- set tool_call = tool_call.function %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
            {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}<|eot_id|>' }}
        {%- endfor %}
    {%- else %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + show(message.content) + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


#: family -> (template builder, what a tool call looks like in an answer)
TOOL_FAMILIES: dict[str, Callable[[str], str]] = {
    "qwen2_5_vl": hermes_template,
    "llava": llama_json_template,
}


def tool_template_for(family: str) -> str:
    return TOOL_FAMILIES[family](IMAGE_STRINGS[family])


def call_text(family: str, name: str, args: dict[str, Any]) -> str:
    """How a model of `family` writes one tool call in its answer."""
    if family == "llava":
        return json.dumps({"name": name, "parameters": args})
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def build_tool_vlm(family: str, out_dir: Path) -> Path:
    """A tiny `family` model saved with a tool-capable chat template."""
    path = build_tiny_vlm(family, out_dir)
    processor = AutoProcessor.from_pretrained(path)
    processor.chat_template = tool_template_for(family)
    processor.save_pretrained(path)
    return path


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
        import safecode_guard.engine as engine_module
        from safecode_guard.scheduler import Scheduler

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

