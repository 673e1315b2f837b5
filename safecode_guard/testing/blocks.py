"""The building blocks: a byte-level BPE tokenizer trained offline, chat templates, and test images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import transformers as tf
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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


