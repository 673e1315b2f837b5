"""Tiny random vision-language models of every supported family (`build_tiny_vlm`, `FAMILIES`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from ..errors import SafeCoDeInputError
from .blocks import chatml_template, gemma_template, make_tokenizer, plain_template

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
class ModelParts:
    """What a family builder returns.

    The config is made after the processor because some processors add tokens
    (PaliGemma adds 1152 `<loc>`/`<seg>` tokens) that the vocabulary must cover.
    """

    processor: Any
    config: Callable[[int], tf.PretrainedConfig]  # vocab_size -> top-level config
    end_of_turn: str | None  # the template's end-of-turn token, also a stop id for `generate`


def text_token_ids(tok: tf.PreTrainedTokenizerFast) -> dict[str, int]:
    return dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def image_tokens_per_side(vision: Mapping[str, Any]) -> int:
    return vision["image_size"] // vision["patch_size"]


def text_head_dim(text: Mapping[str, Any]) -> int:
    return text["hidden_size"] // text["num_attention_heads"]


def llava_parts(text: dict, vision: dict, *, next_: bool = False) -> ModelParts:
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
            cls, extra = tf.LlavaConfig, dict(image_seq_length=image_tokens_per_side(vision) ** 2)
        return cls(vision_config=tf.CLIPVisionConfig(**vision),
                   text_config=tf.LlamaConfig(**text, vocab_size=vocab, **text_token_ids(tok)),
                   image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                   vision_feature_select_strategy="default", **extra)

    return ModelParts(proc, config, "<|im_end|>")


def _idefics3(text: dict, vision: dict, *, smol: bool = False) -> ModelParts:
    """Idefics3 / SmolVLM (SigLIP-like tower, pixel-shuffle connector, Llama), image splitting on."""
    vision = {**TINY_VISION, **vision}
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid)
    tok = make_tokenizer((*specials, *_CHATML_SPECIALS), chat_template=chatml_template("<image>"))
    side, scale = vision["image_size"], 2
    # a 48x40 image becomes 4 tiles of `side` px plus a global view
    sizes = dict(size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side})
    seq_len = image_tokens_per_side(vision) ** 2 // scale**2
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
                          text_config=tf.LlamaConfig(**text, vocab_size=vocab, **text_token_ids(tok)),
                          scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"))

    return ModelParts(proc, config, "<|im_end|>")


def _gemma3(text: dict, vision: dict) -> ModelParts:
    """Gemma3 (SigLIP + pooled projector + Gemma3 text, sliding-window and full layers)."""
    vision = {**TINY_VISION, **vision}
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "image_token": "<image_soft_token>"}
    tok = make_tokenizer((*named.values(), "<start_of_turn>", "<end_of_turn>"), named_special=named,
                         bos="<bos>", eos="<eos>", pad="<pad>", chat_template=gemma_template())
    side = vision["image_size"]
    per_image = (image_tokens_per_side(vision) // 2) ** 2  # the projector average-pools 2x2 patches
    proc = tf.Gemma3Processor(tf.Gemma3ImageProcessor(size={"height": side, "width": side}), tok,
                              image_seq_length=per_image, chat_template=tok.chat_template)

    def config(vocab: int) -> tf.PretrainedConfig:
        head_dim = text_head_dim(text)
        layers = ["full_attention" if i % 2 else "sliding_attention"
                  for i in range(text["num_hidden_layers"])]
        # a window of 16 is shorter than any image prompt, so the sliding-window cache is exercised
        defaults = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                        layer_types=layers)
        text_config = tf.Gemma3TextConfig(**{**defaults, **text}, vocab_size=vocab, **text_token_ids(tok))
        return tf.Gemma3Config(vision_config=tf.SiglipVisionConfig(**vision), text_config=text_config,
                               mm_tokens_per_image=per_image, boi_token_index=tok.boi_token_id,
                               eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)

    return ModelParts(proc, config, "<end_of_turn>")


def _paligemma(text: dict, vision: dict) -> ModelParts:
    """PaliGemma (SigLIP + Gemma); no chat template upstream, so a plain one with images first.

    The processor itself puts `<bos>` after the last `<image>` and appends "\\n".
    """
    vision = {**TINY_VISION, **vision}
    tok = make_tokenizer(("<image>",), bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True)
    side = vision["image_size"]
    image_processor = tf.SiglipImageProcessor(size={"height": side, "width": side})
    image_processor.image_seq_length = image_tokens_per_side(vision) ** 2  # the processor requires it
    proc = tf.PaliGemmaProcessor(image_processor, tok,
                                 chat_template=plain_template("", images_first="<image>"))

    def config(vocab: int) -> tf.PretrainedConfig:
        text_config = tf.GemmaConfig(**{"head_dim": text_head_dim(text), **text}, vocab_size=vocab,
                                     **text_token_ids(tok))
        return tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**vision),
                                  text_config=text_config, vocab_size=vocab,
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])

    return ModelParts(proc, config, None)


def _instructblip(text: dict, vision: dict) -> ModelParts:
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
            text_config=tf.LlamaConfig(**text, vocab_size=vocab, **text_token_ids(tok)),
            num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>"))

    return ModelParts(proc, config, None)


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


def _qwen(text: dict, vision: dict, *, version: str) -> ModelParts:
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
        half = text_head_dim(text) // 2
        hw = half * 3 // 8
        rope = {"rope_type": "default", "mrope_section": [half - 2 * hw, hw, hw], "rope_theta": 1e4}
        if version == "qwen3_vl":
            rope["mrope_interleaved"] = True
        text_config = text_cls(**{"head_dim": text_head_dim(text), **text}, vocab_size=vocab,
                               rope_parameters=rope, **text_token_ids(tok))
        # the vision tower's merger projects into the text model's width
        width_key = "hidden_size" if version == "qwen2_vl" else "out_hidden_size"
        vision_config = vision_cls(**vision, **{width_key: text["hidden_size"]})
        ids = {name: tok.convert_tokens_to_ids(t)
               for name, t in zip(_QWEN_IMAGE_IDS, _QWEN_IMAGE_TOKENS, strict=True)}
        return config_cls(text_config=text_config, vision_config=vision_config, **ids)

    return ModelParts(proc, config, "<|im_end|>")


_BUILDERS: dict[str, Callable[[dict, dict], ModelParts]] = {
    "llava": llava_parts,
    "llava_next": partial(llava_parts, next_=True),
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

def reinit_zero_matrices(model: torch.nn.Module, std: float = 0.02) -> None:
    """Give every all-zero weight matrix random values.

    Gemma3 zero-initialises its image projection (`mm_input_projection_weight`),
    so a random model would ignore the image entirely.
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, std)


def set_generation_ids(
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
    reinit_zero_matrices(model)
    set_generation_ids(model, tok, parts.end_of_turn)
    out = Path(out_dir)
    model.save_pretrained(out)
    parts.processor.save_pretrained(out)
    return out


