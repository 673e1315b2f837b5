"""Tiny random vision-language models, built offline, for tests, benchmarks and examples.

Nothing here downloads anything. Tokenizers are byte-level BPE trained in a
few milliseconds on a built-in English corpus; models are random-weight
instances of the real transformers classes, so every code path a real
checkpoint takes (processor, chat template, forward, KV cache, `generate`)
runs unchanged.

- `build_tiny_vlm(family, out_dir)` saves a 0.2M-parameter (~1 MB) model and its
  processor, for any of `FAMILIES`, into a folder that
  `AutoModelForImageTextToText.from_pretrained` / `AutoProcessor.from_pretrained`
  load.
- `build_bench_llava_model(preset)` returns a random Llava-architecture
  `(model, processor)` in memory for benchmarks: "tiny", "cpu" (~10M
  parameters, ~150-token image prompts) or "gpu" (the LLaVA-1.5-7B shape,
  576 image tokens). `build_bench_llava(out_dir, preset)` saves one.
- `build_tool_vlm(family, out_dir)` saves a tiny model whose chat template takes
  tools (Qwen2.5's `<tool_call>` layout for "qwen2_5_vl", Llama 3.1's JSON calls
  for "llava"), so tools, `with_structured_output` and agents run on it;
  `call_text(family, name, args)` is how such a model writes a call.
- `build_tiny_guard(family, out_dir)` saves a tiny random guard model (Llama Guard 3
  Vision's, Llama Guard 4's or ShieldGemma 2's architecture, `GUARD_FAMILIES`) for
  `judge="guard:<path>"`.
- `make_tokenizer`, the chat templates, `gradient_image`, `stripes_image` and
  `noised_image` are the building blocks.

The weights are random: outputs are gibberish, but they depend on the image
and on the prompt, which is what decoding tests need.
"""

from __future__ import annotations

from .bench_models import build_bench_llava, build_bench_llava_model
from .blocks import (
    CORPUS,
    chatml_template,
    gemma_template,
    gradient_image,
    make_tokenizer,
    noised_image,
    plain_template,
    stripes_image,
)
from .guard_models import GUARD_CORPUS, GUARD_FAMILIES, build_tiny_guard, llama_guard_template
from .tool_models import (
    IMAGE_STRINGS,
    TOOL_FAMILIES,
    build_tool_vlm,
    call_text,
    hermes_template,
    llama_json_template,
    tool_template_for,
)
from .vlms import FAMILIES, TINY_TEXT, TINY_VISION, build_tiny_vlm

__all__ = [
    "CORPUS",
    "FAMILIES",
    "GUARD_CORPUS",
    "GUARD_FAMILIES",
    "IMAGE_STRINGS",
    "TINY_TEXT",
    "TINY_VISION",
    "TOOL_FAMILIES",
    "build_bench_llava",
    "build_bench_llava_model",
    "build_tiny_guard",
    "build_tiny_vlm",
    "build_tool_vlm",
    "call_text",
    "chatml_template",
    "gemma_template",
    "gradient_image",
    "hermes_template",
    "llama_guard_template",
    "llama_json_template",
    "make_tokenizer",
    "noised_image",
    "plain_template",
    "stripes_image",
    "tool_template_for",
]
