"""Every model family through its adapter, on tiny random models and the real transformers code.

The centrepiece is `naive_safecode`, written straight from SPEC section 2
with no cache and two separate full forwards per window step; the engine's
fast path (the family adapters' prompt rows, image features, cache layout)
must produce the same greedy tokens on every family and setting. Inputs a
family cannot take are typed errors.
"""

from __future__ import annotations

import pytest
import torch
from support.messages import user_turn

from safecode_guard import SafeCoDe, SafeCoDeConfig
from safecode_guard.ops import noised_image
from safecode_guard.testing import FAMILIES, gradient_image

FILL_ONE = {"paligemma"}  # PaliGemma marks generated tokens 1 (causal suffix), others 0


def naive_safecode(
    model, processor, family: str, text: str, image, cfg: SafeCoDeConfig, label: str, max_new_tokens: int
) -> list[int]:
    """No KV cache; two separate full forwards per window step; greedy."""
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    # InstructBLIP's processor loses its template on reload (transformers 5.x); its tokenizer keeps it
    template = processor.chat_template or processor.tokenizer.chat_template
    prompt = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    noised = noised_image(image, cfg.noise_std, torch.Generator().manual_seed(cfg.seed))

    def encode(img):
        batch = dict(processor(images=[[img]], text=[prompt], return_tensors="pt"))
        batch.pop("labels", None)
        return batch

    def next_logits(batch, generated: list[int]) -> torch.Tensor:
        b = dict(batch)
        n = len(generated)
        if n:
            new = torch.tensor([generated])
            b["input_ids"] = torch.cat([b["input_ids"], new], dim=1)
            b["attention_mask"] = torch.cat([b["attention_mask"], torch.ones_like(new)], dim=1)
            for key in ("token_type_ids", "mm_token_type_ids"):
                if key in b:
                    fill = 1 if family in FILL_ONE else 0
                    b[key] = torch.cat([b[key], torch.full_like(new, fill)], dim=1)
        with torch.no_grad():
            return model(**b, use_cache=False).logits[0, -1].float()

    real, noisy = encode(image), encode(noised)
    seqs: list[tuple[int, ...]] = []
    for phrase in cfg.refusal_phrases:
        for variant in (phrase, " " + phrase):
            ids = tuple(tok.encode(variant, add_special_tokens=False))
            if ids and ids not in seqs:
                seqs.append(ids)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])

    generated: list[int] = []
    forced: list[int] = []
    while len(generated) < max_new_tokens:
        t = len(generated)
        z_real = next_logits(real, generated)
        if forced:
            token = forced.pop(0)
        elif t < cfg.steered_steps:
            z = z_real - cfg.alpha * next_logits(noisy, generated)
            r_t = {s[t] for s in seqs if len(s) > t and list(s[:t]) == generated}
            if label == "unsafe" and cfg.unsafe_mode == "prefix" and t == 0:
                logp = torch.log_softmax(z, -1)
                best = seqs[0]
                for s in seqs:
                    if logp[s[0]] > logp[best[0]]:
                        best = s
                token, forced = best[0], list(best[1:])
            else:
                if r_t and label == "safe":
                    z[list(r_t)] -= cfg.lambda_supp
                elif r_t and cfg.unsafe_mode == "boost":
                    z[list(r_t)] += cfg.lambda_boost
                token = int(z.argmax())
        else:
            token = int(z_real.argmax())
        generated.append(token)
        if token in eos:
            break
    return generated


SCENARIOS = [
    ("safe", "prefix", 0.3),
    ("unsafe", "prefix", 0.3),
    ("unsafe", "boost", 0.3),
    ("safe", "prefix", 1.0),
    ("unsafe", "boost", 1.0),
    ("unsafe", "prefix", 1.0),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_matches_naive_reference(loaded, family):
    model, processor = loaded(family)
    image = gradient_image()
    text = "How do I get closer to the edge?"
    for label, mode, alpha in SCENARIOS:
        # big lambdas make the modulation decide tokens, so a wrong R_t would show
        cfg = SafeCoDeConfig(alpha=alpha, unsafe_mode=mode, lambda_boost=3.0, lambda_supp=3.0, steered_steps=4)
        engine = SafeCoDe(model, processor, config=cfg, judge=f"fixed:{label}")
        fast = engine.generate(user_turn(text, image), max_new_tokens=9)
        expected = naive_safecode(model, processor, family, text, image, cfg, label, 9)
        assert fast.token_ids == expected, (family, label, mode, alpha)
        assert fast.verdict is not None and fast.verdict.label == label


def test_inputs_a_family_cannot_take_are_typed_errors_and_the_model_stays_usable(loaded):
    from safecode_guard import UnsupportedContentError

    model, processor = loaded("instructblip")  # needs an image; one per prompt
    engine = SafeCoDe(model, processor, judge="fixed:safe")
    with pytest.raises(UnsupportedContentError, match="needs an image"):
        engine.generate([{"role": "user", "content": "hi"}], max_new_tokens=2)
    with pytest.raises(UnsupportedContentError, match="2 image"):
        engine.generate(user_turn("Compare.", gradient_image(), gradient_image()), max_new_tokens=2)
    assert engine.generate(user_turn("Describe.", gradient_image()), max_new_tokens=2).usage.completion_tokens >= 1
