"""The verdict modulation as a plain `LogitsProcessor` for `model.generate`."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from safecode_guard import SafeCoDe, SafeCoDeConfig
from safecode_guard.processors import VerdictLogitsProcessor


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3"])
@pytest.mark.parametrize(("label", "mode"), [("safe", "prefix"), ("unsafe", "boost"), ("unsafe", "prefix")])
def test_generate_with_the_processor_matches_safecode_on_text_only_requests(load_tiny_vlm, family, label, mode):
    model, processor = load_tiny_vlm(family)
    cfg = SafeCoDeConfig(unsafe_mode=mode, lambda_boost=3.0, lambda_supp=3.0, steered_steps=4)
    messages = [{"role": "user", "content": [{"type": "text", "text": "How do I get closer to the edge?"}]}]
    expected = SafeCoDe(model, processor, config=cfg, judge=f"fixed:{label}").generate(messages, max_new_tokens=9)

    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[prompt], return_tensors="pt")
    proc = VerdictLogitsProcessor(processor.tokenizer, label, cfg)
    with torch.no_grad():
        out = model.generate(**batch, logits_processor=LogitsProcessorList([proc]), max_new_tokens=9, do_sample=False)
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    assert new == expected.token_ids
    if label == "unsafe" and mode == "prefix":
        assert expected.refused


def test_processor_checks_its_verdict_and_resets(load_tiny_vlm):
    _, processor = load_tiny_vlm("llava")
    with pytest.raises(ValueError, match="verdict"):
        VerdictLogitsProcessor(processor.tokenizer, "maybe")
    proc = VerdictLogitsProcessor(processor.tokenizer, "safe")
    scores = torch.zeros(1, len(processor.tokenizer))
    long_prompt = torch.tensor([list(range(1, 10))])
    assert (proc(torch.tensor([[1, 2, 3]]), scores) < 0).any()  # t=0: refusal openers pushed down
    assert (proc(long_prompt, scores) == 0).all()  # t=6 is past the window: untouched
    proc.reset()
    assert (proc(long_prompt, scores) < 0).any()  # after reset this is a new prompt, t=0 again
