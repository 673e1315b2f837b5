"""Tiny models whose chat template takes tools (Qwen2.5's `<tool_call>` layout, Llama 3.1's JSON calls)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import transformers as tf

from ..errors import SafeCoDeInputError
from .vlms import build_tiny_vlm

# --------------------------------------------------------------------------- tool-capable tiny models
#
# The tiny models' own templates have no tool support, like many real VLM checkpoints. Two
# real-world tool layouts are written out here for them:
#
# - `hermes_template`: Qwen2.5 style (`<tools>` in the system turn, `<tool_call>{json}</tool_call>`
#   in assistant turns, tool results as `<tool_response>` inside a user turn), for Qwen2.5-VL;
# - `llama_json_template`: Llama 3.1 style (tools listed in the first user turn, calls as a bare
#   `{"name": ..., "parameters": ...}` answer, results in an `ipython` turn), for Llava (a Llama
#   text model).


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


#: family -> the tool layout its tool-capable tiny model gets (`build_tool_vlm`)
TOOL_FAMILIES: dict[str, Callable[[str], str]] = {
    "qwen2_5_vl": hermes_template,
    "llava": llama_json_template,
}


def _check_tool_family(family: str) -> None:
    if family not in TOOL_FAMILIES:
        raise SafeCoDeInputError(
            f"No tool-capable tiny model for family {family!r}. Use one of: {', '.join(TOOL_FAMILIES)}."
        )


def tool_template_for(family: str) -> str:
    """The tool-capable chat template for `family`'s tiny model (one of `TOOL_FAMILIES`)."""
    _check_tool_family(family)
    return TOOL_FAMILIES[family](IMAGE_STRINGS[family])


def call_text(family: str, name: str, args: Mapping[str, Any]) -> str:
    """How a model of `family` writes one tool call in its answer (to script or check answers)."""
    _check_tool_family(family)
    if family == "llava":
        return json.dumps({"name": name, "parameters": args})
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


def build_tool_vlm(family: str, out_dir: str | Path, **kwargs: Any) -> Path:
    """`build_tiny_vlm(family, out_dir, **kwargs)` saved with a tool-capable chat template, so
    `ChatSafeCoDe(model=path).bind_tools(...)` and agents with tools run on it (family: one of
    `TOOL_FAMILIES`). Random weights write random calls: script the answers to test an app."""
    _check_tool_family(family)
    path = build_tiny_vlm(family, out_dir, **kwargs)
    processor = tf.AutoProcessor.from_pretrained(path)
    processor.chat_template = tool_template_for(family)
    processor.save_pretrained(path)
    return path


