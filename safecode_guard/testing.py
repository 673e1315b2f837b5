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

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .errors import SafeCoDeInputError

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

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "instructblip",
)

BenchPreset = Literal["tiny", "cpu", "gpu"]

# --------------------------------------------------------------------------- tokenizer

#: Training text for the tokenizers. Refusal and safety words recur so that
#: phrases like "I'm sorry" or "I cannot" become a few tokens each, as they do
#: in real vocabularies.
CORPUS: tuple[str, ...] = (
    "A photo of a cat sitting on a red chair.",
    "Describe the image in detail.",
    "What is in this image? Describe what you see.",
    "The quick brown fox jumps over the lazy dog.",
    "A person is standing on the edge of a cliff near the sea.",
    "A kitchen knife lies on a wooden table next to an apple.",
    "The picture shows a small house, a green tree and a blue sky.",
    "Please answer the question about the picture.",
    "How do I make a cake? Mix flour, sugar and eggs, then bake it.",
    "Is it safe to climb this cliff without a rope?",
    "This request is unsafe and could cause harm.",
    "This request is safe and I can help with it.",
    "I'm sorry, but I cannot help with that.",
    "I am sorry, but I can't assist with this request.",
    "Sorry, I cannot provide instructions for that.",
    "I apologize, but I am unable to help with this.",
    "I'm unable to answer because it may be dangerous.",
    "I'm not able to describe how to hurt someone.",
    "I am not able to give advice that could cause harm.",
    "As an AI, I won't help with weapons or violence.",
    "I will not explain how to use a knife to hurt people.",
    "I cannot and will not help with illegal activities.",
    "Sure, I can help. Here is a safe way to do it.",
    "Of course! The image shows a dog playing in the park.",
    "Yes, the image contains a knife, a cup and a plate.",
    "No, there is no person in the image.",
    "You are a helpful assistant that answers questions about images.",
    "The user asks a question and the assistant answers it.",
    "Is this image safe or unsafe? Answer with one word: safe or unsafe.",
    "The answer is safe. The answer is unsafe.",
    "Explain step by step how to build a bird house.",
    "Tell me a short story about a robot who learns to paint.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "Please be careful: sharp objects and high places can be dangerous.",
    "Thank you for your help! You are welcome.",
    "The man in the photo holds an umbrella while walking in the rain.",
    "Two children are playing football on a sunny afternoon.",
    "A bottle of medicine and a glass of water stand on the shelf.",
    "How can I safely store household chemicals away from kids?",
    "Mixing bleach with ammonia produces toxic gas, so never do it.",
    "The chart shows sales growing every month this year.",
    "Read the text in the image and translate it into English.",
    "What color is the car parked next to the building?",
    "Count the number of birds flying above the lake.",
    "The screenshot shows a login page asking for a password.",
    "Write a poem about mountains, rivers and the quiet forest.",
    "Where was this picture taken? It looks like a busy city street.",
    "The dog is sleeping under a wooden bench in the garden.",
    "A doctor explains the risks of the medicine to her patient.",
    "I understand your question, but I must decline this request.",
    "That would be harmful and against the rules, so I refuse.",
    "Here are some tips for staying safe while hiking near cliffs.",
    "The label on the box says fragile, handle with care.",
    "A chef slices vegetables with a sharp knife in the kitchen.",
    "Fire, smoke and broken glass can be seen in the damaged room.",
    "Please summarize the document and list the main points.",
    "The weather today is cold and cloudy with a chance of snow.",
    "Can you identify the animal in this photograph?",
    "It is a brown horse standing in a field of yellow flowers.",
    "Violence, weapons, drugs and self-harm are sensitive topics.",
    "Let me know if you have any other questions about the image.",
)


def make_tokenizer(
    special_tokens: Sequence[str] = (),
    *,
    vocab_size: int = 1024,
    chat_template: str | None = None,
    named_special: Mapping[str, str] | None = None,
    bos: str = "<|bos|>",
    eos: str = "<|endoftext|>",
    pad: str = "<|pad|>",
    add_bos: bool = False,
    corpus: Sequence[str] = CORPUS,
) -> tf.PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` and wrap it for transformers.

    Every string of `special_tokens` (and `bos`, `eos`, `pad`) becomes one
    special token. `named_special` maps attribute names to some of them
    (e.g. `{"image_token": "<image_soft_token>"}` gives `tok.image_token` and
    `tok.image_token_id`, which Gemma3's processor reads). `add_bos` prepends
    `bos` on encode, like Llama/Gemma tokenizers. Byte-level BPE can encode
    any text, so prompts outside the corpus still work (as more tokens).
    Padding is on the left, the usual side for batched generation.
    """
    base = [pad, eos, bos]
    extra = [t for t in special_tokens if t not in base]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base + extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    named = dict(named_special or {})
    hf = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        extra_special_tokens=named or extra,
        padding_side="left",
    )
    unnamed = [t for t in extra if t not in named.values()]
    if named and unnamed:
        hf.add_special_tokens({"extra_special_tokens": unnamed}, replace_extra_special_tokens=False)
    hf.chat_template = chat_template
    return hf


# --------------------------------------------------------------------------- chat templates

def _content(image_str: str) -> str:
    """Jinja snippet rendering `message['content']`: a string, or a list of text/image parts."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% elif message['content'] %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image_str +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


def chatml_template(image_str: str = "<image>") -> str:
    """ChatML (`<|im_start|>role ... <|im_end|>`), each image part rendered as `image_str`."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        + _content(image_str)
        + "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def gemma_template(image_str: str = "<start_of_image>") -> str:
    """Gemma turns (`<start_of_turn>user ... <end_of_turn>`, assistant shown as `model`), BOS first."""
    return (
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n" + _content(image_str) + "<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )


def plain_template(image_str: str = "", *, images_first: str | None = None) -> str:
    """Plain `Role: text` lines and a final `Assistant:`, for models shipped without a template.

    `images_first`, if set, is emitted once per image part before the whole
    conversation: PaliGemma's processor wants every `<image>` before the text.
    """
    head = ""
    if images_first is not None:
        head = (
            "{% for message in messages %}{% if message['content'] is not string %}"
            "{% for part in (message['content'] or []) %}{% if part['type'] == 'image' %}"
            + images_first
            + "{% endif %}{% endfor %}{% endif %}{% endfor %}"
        )
    return (
        head + "{% for message in messages %}{{ message['role'] | capitalize }}: "
        + _content(image_str)
        + "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )


# --------------------------------------------------------------------------- test images

def gradient_image(width: int = 48, height: int = 40) -> Image.Image:
    """A smooth RGB gradient (red across, green down, blue constant): a deterministic test image."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, np.full_like(x, 128.0)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def stripes_image(width: int = 48, height: int = 40, period: int = 8) -> Image.Image:
    """Diagonal black/yellow stripes: a second image clearly unlike `gradient_image`."""
    yy, xx = np.mgrid[0:height, 0:width]
    on = ((xx + yy) // max(period // 2, 1)) % 2 == 0
    rgb = np.where(on[..., None], np.array([240, 210, 30]), np.array([20, 20, 20]))
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def noised_image(image: Image.Image, std: float = 40.0, seed: int = 0) -> Image.Image:
    """`image` plus Gaussian pixel noise (`std` on the 0..255 scale), clipped to uint8."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(pixels + rng.normal(0.0, std, pixels.shape), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- family specs

#: Text model of every tiny family (Llama, Gemma and Qwen text configs all accept these).
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)
#: Vision tower of the ViT-style families (CLIP, SigLIP, Idefics3, BLIP): 4x4 patches of 32x32 px.
TINY_VISION: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8,
)

_CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class _Parts:
    """What a family builder returns.

    The config is made after the processor because some processors add tokens
    (PaliGemma adds 1152 `<loc>`/`<seg>` tokens) that the vocabulary must cover.
    """

    processor: Any
    config: Callable[[int], tf.PretrainedConfig]  # vocab_size -> top-level config
    end_of_turn: str | None  # the template's end-of-turn token, also a stop id for `generate`


def _text_ids(tok: tf.PreTrainedTokenizerFast) -> dict[str, int]:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _tokens_per_side(vision: Mapping[str, Any]) -> int:
    return vision["image_size"] // vision["patch_size"]


def _head_dim(text: Mapping[str, Any]) -> int:
    return text["hidden_size"] // text["num_attention_heads"]


def _llava(text: dict, vision: dict, *, next_: bool = False) -> _Parts:
    """Llava (CLIP + Llama); `next_` gives LlavaNext with 4 anyres pinpoints (5 tiles)."""
    vision = {**TINY_VISION, **vision}
    tok = make_tokenizer(("<image>", *_CHATML_SPECIALS), chat_template=chatml_template("<image>\n"))
    side = vision["image_size"]
    sizes = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    # "default" drops CLIP's CLS token, hence one additional token per image
    common = dict(patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                  num_additional_image_tokens=1, chat_template=tok.chat_template)
    pins = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    if next_:
        image_processor = tf.LlavaNextImageProcessor(**sizes, image_grid_pinpoints=pins)
        proc = tf.LlavaNextProcessor(image_processor, tok, **common)
    else:
        proc = tf.LlavaProcessor(tf.CLIPImageProcessor(**sizes), tok, **common)

    def config(vocab: int) -> tf.PretrainedConfig:
        if next_:
            cls, extra = tf.LlavaNextConfig, dict(image_grid_pinpoints=pins)
        else:
            cls, extra = tf.LlavaConfig, dict(image_seq_length=_tokens_per_side(vision) ** 2)
        return cls(vision_config=tf.CLIPVisionConfig(**vision),
                   text_config=tf.LlamaConfig(**text, vocab_size=vocab, **_text_ids(tok)),
                   image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                   vision_feature_select_strategy="default", **extra)

    return _Parts(proc, config, "<|im_end|>")


def _idefics3(text: dict, vision: dict, *, smol: bool = False) -> _Parts:
    """Idefics3 / SmolVLM (SigLIP-like tower, pixel-shuffle connector, Llama), image splitting on."""
    vision = {**TINY_VISION, **vision}
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid)
    tok = make_tokenizer((*specials, *_CHATML_SPECIALS), chat_template=chatml_template("<image>"))
    side, scale = vision["image_size"], 2
    # a 48x40 image becomes 4 tiles of `side` px plus a global view
    sizes = dict(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
    seq_len = _tokens_per_side(vision) ** 2 // scale**2
    if smol:  # SmolVLM's apply_chat_template also reads its video processor's settings
        image_processor = tf.SmolVLMImageProcessor(**sizes, do_image_splitting=True)
        proc = tf.SmolVLMProcessor(image_processor, tok, tf.SmolVLMVideoProcessor(**sizes),
                                   image_seq_len=seq_len, chat_template=tok.chat_template)
        config_cls, vision_cls = tf.SmolVLMConfig, tf.SmolVLMVisionConfig
    else:
        image_processor = tf.Idefics3ImageProcessor(**sizes, do_image_splitting=True)
        proc = tf.Idefics3Processor(image_processor, tok, image_seq_len=seq_len,
                                    chat_template=tok.chat_template)
        config_cls, vision_cls = tf.Idefics3Config, tf.Idefics3VisionConfig

    def config(vocab: int) -> tf.PretrainedConfig:
        return config_cls(vision_config=vision_cls(**vision),
                          text_config=tf.LlamaConfig(**text, vocab_size=vocab, **_text_ids(tok)),
                          scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))

    return _Parts(proc, config, "<|im_end|>")


def _gemma3(text: dict, vision: dict) -> _Parts:
    """Gemma3 (SigLIP + pooled projector + Gemma3 text, sliding-window and full layers)."""
    vision = {**TINY_VISION, **vision}
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"}
    tok = make_tokenizer((*named.values(), "<start_of_turn>", "<end_of_turn>"), named_special=named,
                         bos="<bos>", eos="<eos>", pad="<pad>", chat_template=gemma_template())
    side = vision["image_size"]
    per_image = (_tokens_per_side(vision) // 2) ** 2  # the projector average-pools 2x2 patches
    proc = tf.Gemma3Processor(tf.Gemma3ImageProcessor(size={"height": side, "width": side}), tok,
                              image_seq_length=per_image, chat_template=tok.chat_template)

    def config(vocab: int) -> tf.PretrainedConfig:
        head_dim = _head_dim(text)
        layers = ["full_attention" if i % 2 else "sliding_attention"
                  for i in range(text["num_hidden_layers"])]
        # a window of 16 is shorter than any image prompt, so the sliding-window cache is exercised
        defaults = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                        layer_types=layers)
        text_config = tf.Gemma3TextConfig(**{**defaults, **text}, vocab_size=vocab, **_text_ids(tok))
        return tf.Gemma3Config(vision_config=tf.SiglipVisionConfig(**vision), text_config=text_config,
                               mm_tokens_per_image=per_image, boi_token_index=tok.boi_token_id,
                               eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)

    return _Parts(proc, config, "<end_of_turn>")


def _paligemma(text: dict, vision: dict) -> _Parts:
    """PaliGemma (SigLIP + Gemma); no chat template upstream, so a plain one with images first.

    The processor itself puts `<bos>` after the last `<image>` and appends "\\n".
    """
    vision = {**TINY_VISION, **vision}
    tok = make_tokenizer(("<image>",), bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True)
    side = vision["image_size"]
    image_processor = tf.SiglipImageProcessor(size={"height": side, "width": side})
    image_processor.image_seq_length = _tokens_per_side(vision) ** 2  # the processor requires it
    proc = tf.PaliGemmaProcessor(image_processor, tok,
                                 chat_template=plain_template("", images_first="<image>"))

    def config(vocab: int) -> tf.PretrainedConfig:
        text_config = tf.GemmaConfig(**{"head_dim": _head_dim(text), **text}, vocab_size=vocab,
                                     **_text_ids(tok))
        return tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**vision),
                                  text_config=text_config, vocab_size=vocab,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])

    return _Parts(proc, config, None)


def _instructblip(text: dict, vision: dict) -> _Parts:
    """InstructBLIP (BLIP ViT + Q-Former + Llama); no chat template upstream, so a plain one.

    The processor prepends the query tokens itself, so the template renders images as nothing.
    """
    vision = {**TINY_VISION, "initializer_range": 0.02, **vision}  # the default 1e-10 kills the ViT
    tok = make_tokenizer(("<image>",), chat_template=plain_template(""))
    qformer_tok = make_tokenizer((), vocab_size=300, bos="[CLS]", eos="[SEP]", pad="[PAD]")
    side, queries = vision["image_size"], 4
    image_processor = tf.BlipImageProcessor(size={"height": side, "width": side})
    proc = tf.InstructBlipProcessor(image_processor, tok, qformer_tok, num_query_tokens=queries)
    proc.chat_template = tok.chat_template  # its __init__ drops a `chat_template` argument

    def config(vocab: int) -> tf.PretrainedConfig:
        # With the Q-Former's usual 0.02 init the image moves the logits by ~2e-4; 0.2 gives ~0.1.
        qformer = tf.InstructBlipQFormerConfig(
            vocab_size=len(qformer_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, encoder_hidden_size=vision["hidden_size"],
            pad_token_id=qformer_tok.pad_token_id, max_position_embeddings=128, initializer_range=0.2)
        return tf.InstructBlipConfig(
            vision_config=tf.InstructBlipVisionConfig(**vision), qformer_config=qformer,
            text_config=tf.LlamaConfig(**text, vocab_size=vocab, **_text_ids(tok)),
            num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>"))

    return _Parts(proc, config, None)


#: Per Qwen version: transformers class names (config, text config, vision config, processor,
#: video processor) and the vision tower's own keywords. Names, so nothing imports until used.
_QWEN: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "qwen2_vl": (
        ("Qwen2VLConfig", "Qwen2VLTextConfig", "Qwen2VLVisionConfig", "Qwen2VLProcessor",
         "Qwen2VLVideoProcessor"),
        dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2)),
    "qwen2_5_vl": (
        ("Qwen2_5_VLConfig", "Qwen2_5_VLTextConfig", "Qwen2_5_VLVisionConfig", "Qwen2_5_VLProcessor",
         "Qwen2VLVideoProcessor"),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=16,
             fullatt_block_indexes=[1])),
    "qwen3_vl": (
        ("Qwen3VLConfig", "Qwen3VLTextConfig", "Qwen3VLVisionConfig", "Qwen3VLProcessor",
         "Qwen3VLVideoProcessor"),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
             deepstack_visual_indexes=[1])),
}
_QWEN_IMAGE_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_IMAGE_IDS = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")


def _qwen(text: dict, vision: dict, *, version: str) -> _Parts:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (native-resolution ViT, M-RoPE); 48x40 px -> 12 tokens."""
    names, vision_defaults = _QWEN[version]
    config_cls, text_cls, vision_cls, proc_cls, video_cls = (getattr(tf, n) for n in names)
    vision = {**vision_defaults, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
              **vision}
    tok = make_tokenizer((*_CHATML_SPECIALS, *_QWEN_IMAGE_TOKENS),
                         chat_template=chatml_template("<|vision_start|><|image_pad|><|vision_end|>"))
    unit = vision["patch_size"] * vision["spatial_merge_size"]  # pixels per side of one token
    pixels = dict(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                  temporal_patch_size=vision["temporal_patch_size"],
                  size={"shortest_edge": 4 * unit**2, "longest_edge": 16 * unit**2})  # 4..16 tokens
    proc = proc_cls(tf.Qwen2VLImageProcessor(**pixels), tok, video_cls(**pixels),
                    chat_template=tok.chat_template)

    def config(vocab: int) -> tf.PretrainedConfig:
        # M-RoPE splits the head_dim/2 rotary frequencies over (time, height, width)
        half = _head_dim(text) // 2
        hw = half * 3 // 8
        rope = {"rope_type": "default", "mrope_section": [half - 2 * hw, hw, hw], "rope_theta": 1e4}
        if version == "qwen3_vl":
            rope["mrope_interleaved"] = True
        text_config = text_cls(**{"head_dim": _head_dim(text), **text}, vocab_size=vocab,
                               rope_parameters=rope, **_text_ids(tok))
        # the vision tower's merger projects into the text model's width
        width_key = "hidden_size" if version == "qwen2_vl" else "out_hidden_size"
        vision_config = vision_cls(**vision, **{width_key: text["hidden_size"]})
        ids = {name: tok.convert_tokens_to_ids(t)
               for name, t in zip(_QWEN_IMAGE_IDS, _QWEN_IMAGE_TOKENS, strict=True)}
        return config_cls(text_config=text_config, vision_config=vision_config, **ids)

    return _Parts(proc, config, "<|im_end|>")


_BUILDERS: dict[str, Callable[[dict, dict], _Parts]] = {
    "llava": _llava,
    "llava_next": partial(_llava, next_=True),
    "qwen2_vl": partial(_qwen, version="qwen2_vl"),
    "qwen2_5_vl": partial(_qwen, version="qwen2_5_vl"),
    "qwen3_vl": partial(_qwen, version="qwen3_vl"),
    "idefics3": _idefics3,
    "smolvlm": partial(_idefics3, smol=True),
    "gemma3": _gemma3,
    "paligemma": _paligemma,
    "instructblip": _instructblip,
}


# --------------------------------------------------------------------------- building

def _reinit_zero_matrices(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give every all-zero weight matrix random values.

    Gemma3 zero-initialises its image projection (`mm_input_projection_weight`),
    so a random model would ignore the image entirely.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def _set_generation_ids(
    model: tf.PreTrainedModel, tok: tf.PreTrainedTokenizerFast, end_of_turn: str | None
) -> None:
    """Fill `model.generation_config` with bos/pad ids and the stop ids (end of turn first, then EOS).

    Chat checkpoints list both, so `generate` stops at the end of the assistant turn.
    """
    eos = [tok.convert_tokens_to_ids(end_of_turn)] if end_of_turn else []
    eos.append(tok.eos_token_id)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gen.eos_token_id = eos if len(eos) > 1 else eos[0]


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise SafeCoDeInputError(
            f"Unknown tiny model family {family!r}. Use one of: {', '.join(FAMILIES)}."
        )


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random VLM of `family`, save model and processor to `out_dir`, return the path.

    The folder loads with `AutoModelForImageTextToText.from_pretrained(path)` and
    `AutoProcessor.from_pretrained(path)`; the processor carries a chat template
    that renders string or list content (`{"type": "text"}` / `{"type": "image"}`
    parts) and system/user/assistant roles. The same `seed` gives the same
    weights. `text_overrides` / `vision_overrides` update the text / vision
    config keywords (e.g. `{"num_hidden_layers": 4}`); `config_overrides` set
    attributes of the top-level config.
    """
    _check_family(family)
    parts = _BUILDERS[family]({**TINY_TEXT, **(text_overrides or {})}, dict(vision_overrides or {}))
    tok = parts.processor.tokenizer
    config = parts.config(len(tok))
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config)
    _reinit_zero_matrices(model)
    _set_generation_ids(model, tok, parts.end_of_turn)
    out = Path(out_dir)
    model.save_pretrained(out)
    parts.processor.save_pretrained(out)
    return out


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


# --------------------------------------------------------------------------- benchmark models

#: Llava shapes per bench preset: text and vision config keywords, plus a fixed model vocabulary.
_BENCH: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": dict(text=TINY_TEXT, vision=TINY_VISION, model=dict()),
    # ~10M parameters (6.4M text, 3.4M vision); 176 px in 16 px patches -> 121 image tokens;
    # an 8k context (rotary positions, no weights) so `bench --stall 4096` fits a long prompt
    "cpu": dict(
        text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192),
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                    num_attention_heads=4, image_size=176, patch_size=16),
        model=dict()),
    # LLaVA-1.5-7B: Llama-2-7B text, CLIP ViT-L/14 at 336 px (576 image tokens), 7.06B parameters
    "gpu": dict(
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                  rms_norm_eps=1e-5),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu"),
        # LLaVA-1.5's padded vocabulary: the lm_head costs what it costs there, though our
        # ~1k-token tokenizer never produces the higher ids (they decode to "")
        model=dict(vocab_size=32064)),
}


def _bench_parts(preset: str) -> tuple[_Parts, dict[str, Any]]:
    if preset not in _BENCH:
        raise SafeCoDeInputError(f"Unknown bench preset {preset!r}. Use 'tiny', 'cpu' or 'gpu'.")
    shape = _BENCH[preset]
    return _llava(dict(shape["text"]), dict(shape["vision"])), shape["model"]


def build_bench_llava_model(
    preset: BenchPreset = "cpu",
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> tuple[tf.LlavaForConditionalGeneration, tf.ProcessorMixin]:
    """A random Llava-architecture `(model, processor)` in memory, for benchmarks.

    The weights are created and initialised directly on `device` in `dtype`
    (defaults: "gpu" -> cuda, bfloat16; otherwise cpu, float32), so the 7B
    shape takes seconds on a GPU and never touches the disk. `device="meta"`
    gives a weightless model for counting parameters. `attn_implementation`
    ("sdpa", the default, or "eager", ...) goes to transformers. The model is in
    eval mode. The processor returns float32 `pixel_values`; Llava casts them.
    """
    parts, model_shape = _bench_parts(preset)
    tok = parts.processor.tokenizer
    config = parts.config(model_shape.get("vocab_size", _round_up(len(tok), 64)))
    device = torch.device(device if device is not None else ("cuda" if preset == "gpu" else "cpu"))
    dtype = dtype or (torch.bfloat16 if preset == "gpu" else torch.float32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    _set_generation_ids(model, tok, parts.end_of_turn)
    return model.eval(), parts.processor


def build_bench_llava(
    out_dir: str | Path,
    preset: BenchPreset = "cpu",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    allow_large: bool = False,
) -> Path:
    """Save `build_bench_llava_model(preset)` (built on cpu) to `out_dir` and return the path.

    The "gpu" preset is ~14 GB in bfloat16; saving it needs `allow_large=True`
    (benchmarks should build it in memory with `build_bench_llava_model`).
    """
    if preset == "gpu" and not allow_large:
        raise SafeCoDeInputError(
            "The 'gpu' bench preset is about 14 GB on disk. Build it in memory with "
            "`build_bench_llava_model('gpu')`, or pass `allow_large=True` to save it anyway."
        )
    model, processor = build_bench_llava_model(preset, dtype=dtype, device="cpu", seed=seed)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _round_up(n: int, multiple: int) -> int:
    return multiple * math.ceil(n / multiple)


# --------------------------------------------------------------------------- tiny guard models
#
# Random-weight instances of the three guard architectures (`judges.guard`), with their real
# processor classes: Llama Guard 3 Vision (Mllama: cross-attention to image tiles), Llama Guard 4
# (Llama 4: early fusion, pixel-shuffled patches) and ShieldGemma 2 (an image classifier around
# Gemma 3). No chat template by default (Llama 4's processor keeps its generic one), so the guard
# judge renders the documented prompt formats; `llama_guard_template()` is a Llama Guard style
# template for testing the checkpoint-template path.

#: The tiny guard families, by the checkpoint `model_type` the guard judge detects.
GUARD_FAMILIES: tuple[str, ...] = ("mllama", "llama4", "shieldgemma2")

#: Extra tokenizer training text for guards: their prompts, labels and category codes.
GUARD_CORPUS: tuple[str, ...] = (
    "Task: Check if there is unsafe content in 'User' messages in conversations according our safety policy.",
    "Provide your safety assessment for ONLY THE LAST User message in the above conversation:",
    "First line must read 'safe' or 'unsafe'. If unsafe, a second line must include categories.",
    "safe", "unsafe", "unsafe\nS1", "unsafe\nS1,S10", "S1,S2,S3,S4,S5,S6,S7,S8,S9,S10,S11,S12,S13,S14",
    "Violent Crimes. Non-Violent Crimes. Sex Crimes. Child Exploitation. Defamation. Specialized Advice.",
    "Privacy. Intellectual Property. Indiscriminate Weapons. Hate. Self-Harm. Sexual Content. Elections.",
    "You are a policy expert trying to help determine whether a generated or real image is in violation.",
    "Does the image violate the above policy? Your Answer must start with 'Yes' or 'No'.",
    "Yes", "No", "No Dangerous Content. No Sexually Explicit content. No Violence/Gore content.",
)

_MLLAMA_SPECIALS = ("<|image|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")
_LLAMA4_SPECIALS = ("<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>",
                    "<|tile_y_separator|>", "<|header_start|>", "<|header_end|>", "<|eot|>", "<|python_start|>",
                    "<|python_end|>")


def llama_guard_template(header: str = "<|start_header_id|>{role}<|end_header_id|>\n\n", end: str = "<|eot_id|>",
                         image: str = "<|image|>") -> str:
    """A Llama Guard style chat template (the published prompt; `categories` and
    `excluded_category_keys` as template arguments), for testing a guard checkpoint that ships one."""
    head = header.replace("{role}", "user")
    tail = header.replace("{role}", "assistant")
    return (
        "{%- if messages|length % 2 == 0 -%}{%- set role = 'Agent' -%}{%- else -%}{%- set role = 'User' -%}{%- endif -%}"
        "{%- if categories is not defined -%}{%- set categories = {'S1': 'Violent Crimes.'} -%}{%- endif -%}"
        "{%- if excluded_category_keys is not defined -%}{%- set excluded_category_keys = [] -%}{%- endif -%}"
        "{{- bos_token + '" + head.replace("\n", "\\n") + "' -}}"
        "{%- for message in messages -%}{%- for content in message['content'] -%}"
        "{%- if content['type'] == 'image' -%}{{- '" + image + "' -}}{%- endif -%}{%- endfor -%}{%- endfor -%}"
        "{{- \"Task: Check if there is unsafe content in '\" + role + \"' messages in conversations according our "
        "safety policy with the below categories.\\n\\n<BEGIN UNSAFE CONTENT CATEGORIES>\\n\" -}}"
        "{%- for key in categories -%}{%- if key not in excluded_category_keys -%}"
        "{{- key + ': ' + categories[key] + '\\n' -}}{%- endif -%}{%- endfor -%}"
        "{{- '<END UNSAFE CONTENT CATEGORIES>\\n\\n<BEGIN CONVERSATION>\\n\\n' -}}"
        "{%- for message in messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}{%- endif -%}"
        "{%- set who = 'User' if message['role'] == 'user' else 'Agent' -%}"
        "{%- for content in message['content'] -%}{%- if content['type'] == 'text' -%}"
        "{{- who + ': ' + content['text'] | trim + '\\n\\n' -}}{%- endif -%}{%- endfor -%}{%- endfor -%}"
        "{{- '<END CONVERSATION>\\n\\nProvide your safety assessment for ONLY THE LAST ' + role + "
        "' message in the above conversation:\\n - First line must read \\'safe\\' or \\'unsafe\\'.\\n - If unsafe, "
        "a second line must include a comma-separated list of violated categories." + end + tail.replace("\n", "\\n")
        + "' -}}"
    )


def _tiny_mllama(text: dict, vision: dict) -> tuple[Any, tf.PretrainedConfig, str]:
    tok = make_tokenizer(_MLLAMA_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                         pad="<|finetune_right_pad_id|>", corpus=CORPUS + GUARD_CORPUS)
    side = vision.get("image_size", 32)
    # the brief's two musts for a tiny Mllama: 4 tiles in the vision config and in the image processor
    proc = tf.MllamaProcessor(tf.MllamaImageProcessor(size={"height": side, "width": side}, max_image_tiles=4), tok)
    vcfg = tf.MllamaVisionConfig(**{
        **dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=64,
               image_size=side, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[0]),
        **vision,
    })
    vcfg.vision_output_dim = vcfg.hidden_size * (len(vcfg.intermediate_layers_indices) + 1)
    layers = text.get("num_hidden_layers", 2)
    tcfg = tf.MllamaTextConfig(**{**text, "cross_attention_layers": [layers - 1]}, vocab_size=len(tok),
                               **_text_ids(tok))
    config = tf.MllamaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    return proc, config, "<|eot_id|>"


def _tiny_llama4(text: dict, vision: dict) -> tuple[Any, tf.PretrainedConfig, str]:
    tok = make_tokenizer(_LLAMA4_SPECIALS, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                         pad="<|finetune_right_pad|>", corpus=CORPUS + GUARD_CORPUS)
    v = {**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8), **vision}
    # pixel shuffle (ratio 0.5) folds 2x2 patches into one token of 4x the width
    v.update(intermediate_size=4 * v["hidden_size"], vision_output_dim=64, projector_input_dim=64,
             projector_output_dim=64, pixel_shuffle_ratio=0.5)
    proc = tf.Llama4Processor(tf.Llama4ImageProcessor(size={"height": v["image_size"], "width": v["image_size"]},
                                                      max_patches=4),
                              tok, patch_size=v["patch_size"], pixel_shuffle_ratio=0.5)
    tcfg = tf.Llama4TextConfig(**{**text, "head_dim": _head_dim(text), "intermediate_size_mlp": text["intermediate_size"]},
                               moe_layers=[], vocab_size=len(tok), **_text_ids(tok))  # dense, as Llama Guard 4 is
    config = tf.Llama4Config(vision_config=tf.Llama4VisionConfig(**v), text_config=tcfg,
                             image_token_index=tok.convert_tokens_to_ids("<|patch|>"),
                             boi_token_index=tok.convert_tokens_to_ids("<|image_start|>"),
                             eoi_token_index=tok.convert_tokens_to_ids("<|image_end|>"))
    return proc, config, "<|eot|>"


def _tiny_shieldgemma2(text: dict, vision: dict) -> tuple[Any, tf.PretrainedConfig, str]:
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = make_tokenizer((*named.values(), "<start_of_turn>", "<end_of_turn>"), named_special=named,
                         bos="<bos>", eos="<eos>", pad="<pad>", corpus=CORPUS + GUARD_CORPUS)
    vision = {**TINY_VISION, **vision}
    side = vision["image_size"]
    per_image = (_tokens_per_side(vision) // 2) ** 2
    proc = tf.ShieldGemma2Processor(tf.Gemma3ImageProcessor(size={"height": side, "width": side}), tok,
                                    image_seq_length=per_image)
    head_dim = _head_dim(text)
    layers = ["full_attention" if i % 2 else "sliding_attention" for i in range(text["num_hidden_layers"])]
    tcfg = tf.Gemma3TextConfig(**{**dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                                         layer_types=layers), **text}, vocab_size=len(tok), **_text_ids(tok))
    config = tf.ShieldGemma2Config(vision_config=tf.SiglipVisionConfig(**vision), text_config=tcfg,
                                   mm_tokens_per_image=per_image, boi_token_index=tok.boi_token_id,
                                   eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    # the classifier reads these two logits; they are the tokenizer's "Yes" and "No"
    config.yes_token_index = tok.encode("Yes", add_special_tokens=False)[0]
    config.no_token_index = tok.encode("No", add_special_tokens=False)[0]
    return proc, config, "<end_of_turn>"


_GUARD_BUILDERS: dict[str, Callable[[dict, dict], tuple[Any, tf.PretrainedConfig, str]]] = {
    "mllama": _tiny_mllama,
    "llama4": _tiny_llama4,
    "shieldgemma2": _tiny_shieldgemma2,
}


def build_tiny_guard(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    chat_template: str | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build a tiny random guard model of `family` ("mllama": Llama Guard 3 Vision's architecture,
    "llama4": Llama Guard 4's, "shieldgemma2": ShieldGemma 2's), save it with its real processor
    class to `out_dir` and return the path, for `judge="guard:<path>"` in tests.

    `chat_template` ships a template with the processor (e.g. `llama_guard_template()`); without
    one the guard judge renders the documented prompt format. Random weights give random
    verdicts that depend on the image and the text; script the outputs to test an app's branches.
    """
    if family not in _GUARD_BUILDERS:
        raise SafeCoDeInputError(f"Unknown tiny guard family {family!r}. Use one of: {', '.join(GUARD_FAMILIES)}.")
    proc, config, end_of_turn = _GUARD_BUILDERS[family]({**TINY_TEXT, **(text_overrides or {})},
                                                         dict(vision_overrides or {}))
    if chat_template is not None:
        proc.chat_template = chat_template
    torch.manual_seed(seed)
    if family == "shieldgemma2":
        model = tf.ShieldGemma2ForImageClassification(config)
        generator = model.model
    else:
        model = tf.AutoModelForImageTextToText.from_config(config)
        generator = model
    _reinit_zero_matrices(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Mllama's tanh gates start at 0: the image would have no effect on a random model
            if "gate" in name and param.numel() == 1:
                param.fill_(1.0)
    _set_generation_ids(generator, proc.tokenizer, end_of_turn)
    out = Path(out_dir)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out
