"""Random Llava-architecture models at benchmark sizes (`tiny`, `cpu`, `gpu`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import transformers as tf

from ..errors import SafeCoDeInputError
from .vlms import TINY_TEXT, TINY_VISION, ModelParts, llava_parts, set_generation_ids

BenchPreset = Literal["tiny", "cpu", "gpu"]

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


def _bench_parts(preset: str) -> tuple[ModelParts, dict[str, Any]]:
    if preset not in _BENCH:
        raise SafeCoDeInputError(f"Unknown bench preset {preset!r}. Use 'tiny', 'cpu' or 'gpu'.")
    shape = _BENCH[preset]
    return llava_parts(dict(shape["text"]), dict(shape["vision"])), shape["model"]


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
    set_generation_ids(model, tok, parts.end_of_turn)
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


