"""The tiny-model builders: every family loads with the Auto classes, renders a chat, and sees the image."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from safecode_guard.config import DEFAULT_REFUSAL_PHRASES
from safecode_guard.errors import SafeCoDeInputError
from safecode_guard.testing import (
    FAMILIES,
    build_bench_llava,
    build_bench_llava_model,
    build_tiny_vlm,
    chatml_template,
    gemma_template,
    gradient_image,
    make_tokenizer,
    noised_image,
    plain_template,
)

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
]

# What each processor returns for a batch of two one-image prompts ("labels" from PaliGemma is dropped).
BASE_KEYS = {"input_ids", "attention_mask", "pixel_values"}
EXTRA_KEYS = {
    "llava": set(),
    "llava_next": {"image_sizes"},
    "qwen2_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen2_5_vl": {"image_grid_thw", "mm_token_type_ids"},
    "qwen3_vl": {"image_grid_thw", "mm_token_type_ids"},
    "idefics3": {"pixel_attention_mask"},
    "smolvlm": {"pixel_attention_mask"},
    "gemma3": {"token_type_ids"},
    "paligemma": {"token_type_ids"},
    "instructblip": {"qformer_input_ids", "qformer_attention_mask"},
}
# Image placeholder tokens per 48x40 image after the processor expands them.
IMAGE_TOKENS = {"llava": 16, "llava_next": 70, "qwen2_vl": 12, "qwen2_5_vl": 12, "qwen3_vl": 12,
                "idefics3": 20, "smolvlm": 20, "gemma3": 4, "paligemma": 16, "instructblip": 4}
# Processors that reject a flat `images=[img, noised]` for two prompts and need `[[img], [noised]]`.
NESTED_ONLY = {"smolvlm", "gemma3"}


def render(processor, messages=MESSAGES) -> str:
    # InstructBLIP's processor drops its chat template on reload (see the test below); the tokenizer keeps it.
    template = processor.chat_template or processor.tokenizer.chat_template
    return processor.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )


def image_token_id(config) -> int:
    # Llava/Qwen/Idefics3 call it image_token_id; Gemma3/PaliGemma/InstructBLIP image_token_index
    value = getattr(config, "image_token_id", None)
    return value if value is not None else config.image_token_index


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_renders_and_sees_the_image(family, load_tiny_vlm, test_image):
    model, processor = load_tiny_vlm(family)
    prompt = render(processor)
    assert "You are a helpful assistant." in prompt and "Describe the image." in prompt

    batch = processor(images=[[test_image], [noised_image(test_image)]], text=[prompt, prompt],
                      return_tensors="pt", padding=True)
    batch.pop("labels", None)
    assert set(batch) == BASE_KEYS | EXTRA_KEYS[family]
    image_tokens = (batch["input_ids"] == image_token_id(model.config)).sum(1)
    assert image_tokens.tolist() == [IMAGE_TOKENS[family]] * 2

    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    assert logits.shape == (2, model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-3, "the noised image should change the next-token logits"

    new = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert new.shape == (2, batch["input_ids"].shape[1] + 3)

    eos = model.generation_config.eos_token_id
    assert processor.tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_flat_image_list_works_except_where_nesting_is_required(family, load_tiny_vlm, test_image):
    _, processor = load_tiny_vlm(family)
    prompt, noised = render(processor), noised_image(test_image)
    nested = processor(images=[[test_image], [noised]], text=[prompt] * 2, return_tensors="pt")
    if family in NESTED_ONLY:
        with pytest.raises(ValueError, match="images"):
            processor(images=[test_image, noised], text=[prompt] * 2, return_tensors="pt")
    else:
        flat = processor(images=[test_image, noised], text=[prompt] * 2, return_tensors="pt")
        assert torch.equal(flat["input_ids"], nested["input_ids"])
        assert torch.equal(flat["pixel_values"], nested["pixel_values"])


def test_instructblip_chat_template_survives_only_on_the_tokenizer(load_tiny_vlm):
    # transformers 5.24: InstructBlipProcessor.__init__ does not pass `chat_template` on, so
    # AutoProcessor.from_pretrained loses it; the tokenizer loads the same chat_template.jinja.
    _, processor = load_tiny_vlm("instructblip")
    assert processor.chat_template is None
    assert processor.tokenizer.chat_template == plain_template("")


def test_paligemma_processor_adds_bos_and_newline(load_tiny_vlm, test_image):
    _, processor = load_tiny_vlm("paligemma")
    ids = processor(images=[test_image], text=[render(processor)], return_tensors="pt")["input_ids"][0]
    text = processor.tokenizer.decode(ids[IMAGE_TOKENS["paligemma"]:])
    assert text.startswith("<bos>System: You are a helpful assistant.\n")
    assert text.endswith("Assistant:\n")


def test_build_is_seeded_and_overridable(tmp_path):
    first = build_tiny_vlm("llava", tmp_path / "a", seed=3)
    again = build_tiny_vlm("llava", tmp_path / "b", seed=3)
    reseeded = build_tiny_vlm("llava", tmp_path / "c", seed=4)
    weights = "model.safetensors"
    assert (first / weights).read_bytes() == (again / weights).read_bytes()
    assert (first / weights).read_bytes() != (reseeded / weights).read_bytes()

    other = build_tiny_vlm("llava", tmp_path / "d", text_overrides={"num_hidden_layers": 3},
                           vision_overrides={"num_hidden_layers": 1}, tie_word_embeddings=True)
    model = AutoModelForImageTextToText.from_pretrained(other)
    assert model.config.text_config.num_hidden_layers == 3
    assert model.config.vision_config.num_hidden_layers == 1
    assert model.config.tie_word_embeddings is True


def test_unknown_family_and_preset_name_the_fix(tmp_path):
    with pytest.raises(SafeCoDeInputError, match="llava_next"):
        build_tiny_vlm("llama", tmp_path)
    with pytest.raises(SafeCoDeInputError, match="'cpu'"):
        build_bench_llava_model("huge")
    with pytest.raises(SafeCoDeInputError, match="allow_large=True"):
        build_bench_llava(tmp_path, "gpu")


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user",
     "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "What?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "Sure?"},
]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (chatml_template("<image>"),
         "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nLook:<image>What?<|im_end|>\n"
         "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"),
        (gemma_template(),
         "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nLook:<start_of_image>What?"
         "<end_of_turn>\n<start_of_turn>model\nA cat.<end_of_turn>\n<start_of_turn>user\nSure?<end_of_turn>\n"
         "<start_of_turn>model\n"),
        (plain_template("", images_first="<image>"),
         "<image>System: Be brief.\nUser: Look:What?\nAssistant: A cat.\nUser: Sure?\nAssistant:"),
    ],
)
def test_chat_templates_render_roles_strings_lists_and_images(template, expected):
    tok = make_tokenizer(("<image>",), bos="<bos>", chat_template=template)
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False) == expected


def test_refusal_phrases_are_a_few_tokens():
    tok = make_tokenizer()
    for phrase in DEFAULT_REFUSAL_PHRASES:
        assert len(tok.tokenize(phrase)) <= 5, phrase
    assert tok.tokenize(" knife") == ["Ġknife"] and tok.tokenize(" unsafe") == ["Ġunsafe"]


def test_noised_image_is_seeded_and_differs():
    image = gradient_image()
    assert image.size == (48, 40) and image.mode == "RGB"
    assert noised_image(image, seed=1).tobytes() == noised_image(image, seed=1).tobytes()
    assert noised_image(image).tobytes() != image.tobytes()


def test_bench_cpu_preset_is_about_10m_params_with_150_token_prompts(test_image):
    model, processor = build_bench_llava_model("cpu")
    assert 8e6 < sum(p.numel() for p in model.parameters()) < 12e6
    request = [{"role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]
    batch = processor(images=[[test_image]], text=[render(processor, request)], return_tensors="pt")
    assert 130 <= batch["input_ids"].shape[1] <= 170
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 121


def test_bench_gpu_preset_has_the_llava_1_5_7b_shape(test_image):
    model, processor = build_bench_llava_model("gpu", device="meta")  # no memory, no init
    assert model.dtype == torch.bfloat16
    assert 7.0e9 < sum(p.numel() for p in model.parameters()) < 7.1e9
    assert model.config.text_config.vocab_size == 32064
    batch = processor(images=[[test_image]], text=[render(processor)], return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 576


def test_bench_llava_saves_a_loadable_folder(tmp_path, test_image):
    path = build_bench_llava(tmp_path, "tiny")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    batch = processor(images=[[test_image]], text=[render(processor)], return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()
