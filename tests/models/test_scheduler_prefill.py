"""Prefill: prompts of different lengths share it, long ones go in chunks, images are encoded once.

On tiny random models of every family through the real transformers
code. A chunked prefill must give the logits of a whole one (to float
rounding) and every answer the tokens it gets alone with a whole prefill;
a chunk never cuts a span that attends both ways (Gemma3's images,
PaliGemma's prompt); running streams advance between a long prompt's
chunks; and a self judge's prompt and the answer share their images'
features, so the vision tower runs once per view.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest
import torch
from support.messages import user_turn

from safecode_guard import BatchingConfig, SafeCoDe, ops
from safecode_guard.engine.adapters import (
    Decoder,
    FeatureCache,
    ImageFeatures,
    Prefill,
    detect_quirks,
    encode_rows,
)
from safecode_guard.testing import FAMILIES, gradient_image, stripes_image

NEEDS_IMAGE = {"paligemma", "instructblip"}
CHUNK = 16  # prompt tokens per chunk, over all rows: tiny prompts still take several chunks


def long_text(family: str) -> str:
    # InstructBLIP's tiny Q-Former reads the prompt too, and holds 128 positions at most
    return "Describe the picture in detail, then say what could go wrong here. " * (1 if family == "instructblip" else 4)


def template_prompt(processor: Any, text: str, image: bool) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
    template = processor.chat_template or processor.tokenizer.chat_template
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=template, add_generation_prompt=True, tokenize=False
    )


# -- the decoder: one chunked prefill against whole ones -------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_chunked_shared_prefill_gives_the_logits_of_whole_solo_prefills(fresh, family):
    model, processor = fresh(family)
    decoder = Decoder(model, detect_quirks(model))
    a, b = gradient_image(48, 40), stripes_image(40, 48)
    noised = ops.noised_image(a, 0.1, torch.Generator().manual_seed(0))
    rows = encode_rows(processor, template_prompt(processor, "Describe the image.", True), [[a], [noised]])
    rows += encode_rows(processor, template_prompt(processor, long_text(family), True), [[b]])
    if family not in NEEDS_IMAGE:
        rows += encode_rows(processor, template_prompt(processor, "How can I get there fast?", False), [])
    assert len({r.length for r in rows}) > 1
    solo = torch.cat([decoder.prefill([row])[1] for row in rows])

    prefill = Prefill(decoder, rows, [decoder.encode_images(r) for r in rows])
    ends = []
    while not prefill.finished:
        ends.append(prefill.next_end(CHUNK * len(rows)))
        decoder.run_chunk(prefill, ends[-1])
    batch, together = decoder.finish(prefill)

    if family == "paligemma":  # its prompt attends both ways throughout: never cut
        assert ends == [prefill.length]
    else:
        assert len(ends) >= 3, ends
    torch.testing.assert_close(together, solo, atol=1e-5, rtol=1e-5)
    assert together.argmax(-1).tolist() == solo.argmax(-1).tolist()
    # the rows come out right-aligned, ready to decode
    assert batch.size == len(rows) and batch.length == prefill.length + 1


def test_a_chunk_never_cuts_an_image_that_attends_both_ways(fresh):
    model, processor = fresh("gemma3")
    decoder = Decoder(model, detect_quirks(model))
    assert decoder.quirks.prompt_blocks == "images"
    rows = encode_rows(processor, template_prompt(processor, "Describe the image.", True), [[gradient_image()]])
    rows += encode_rows(processor, template_prompt(processor, long_text("gemma3"), True), [[stripes_image()]])
    prefill = Prefill(decoder, rows, [decoder.encode_images(r) for r in rows])
    images = prefill.spans
    assert len(images) == 2  # one image per row, at different columns
    cuts = []
    while not prefill.finished:
        cuts.append(prefill.next_end(4))  # 2 columns a chunk: narrower than an image
        decoder.run_chunk(prefill, cuts[-1])
    assert not [c for c in cuts for start, end in images if start < c < end], (cuts, images)
    assert any(end - start > 2 for start, end in zip([0, *cuts], cuts, strict=False))  # an image took a wider chunk

    assert detect_quirks(fresh("llava")[0]).prompt_blocks == "none"  # causal: cut anywhere (features pre-encoded)


def test_chunks_narrow_as_their_tokens_attend_to_more_context():
    from safecode_guard.engine.adapters import attention_span, chunk_columns, chunk_cost
    from safecode_guard.testing import build_bench_llava_model

    span = 2048.0
    first = chunk_columns(512, 2, 0, span)
    assert chunk_cost(2, 0, first, span) <= 512 < chunk_cost(2, 0, first + 1, span)
    late = chunk_columns(512, 2, 4096, span)
    assert chunk_cost(2, 4096, 4096 + late, span) <= 512 < chunk_cost(2, 4096, 4097 + late, span)
    assert late < first / 2 and chunk_columns(512, 2, 0, 1e12) == 256  # no attention cost: plain token count
    assert chunk_columns(1, 64, 10_000, span) == 1  # always some progress
    # about 2k tokens of context for the CPU bench preset, 25k for the LLaVA-1.5-7B shape
    shapes = {p: attention_span(build_bench_llava_model(p, device="meta")[0].config.get_text_config()) for p in ("cpu", "gpu")}
    assert shapes == {"cpu": 2048.0, "gpu": 24704.0}


# -- the scheduler: answers, interleaving, cancellation ---------------------------------------


def requests(family: str) -> list[tuple[list[dict], dict[str, Any]]]:
    reqs = [
        (user_turn(long_text(family), gradient_image(48, 40)), {"max_new_tokens": 10}),
        (user_turn("What is this?", stripes_image(48, 40)), {"max_new_tokens": 8, "do_sample": True, "seed": 4}),
        (user_turn("Describe the image.", gradient_image(48, 40).rotate(180)), {"max_new_tokens": 12}),
    ]
    if family not in NEEDS_IMAGE:
        reqs.append(([{"role": "user", "content": long_text(family)}], {"max_new_tokens": 9}))
    return reqs


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_shared_prefills_answer_as_whole_solo_prefills(fresh, family):
    whole = SafeCoDe(*fresh(family), judge="fixed:safe", batching=BatchingConfig(prefill_chunk_tokens=None))
    alone = [whole.generate(msgs, **kw).token_ids for msgs, kw in requests(family)]
    assert whole.scheduler.stats["prefill_chunks"] == len(alone)  # one forward per prompt

    chunked = SafeCoDe(*fresh(family), judge="fixed:safe", batching=BatchingConfig(prefill_chunk_tokens=CHUNK))
    chunked.generate(user_turn("Hi", gradient_image()), max_new_tokens=2)  # the first prefill shows the cache kind
    (first, first_kw), *rest = requests(family)
    streams = [chunked.stream(first, **first_kw)]
    # decoding (its first token is out; its first *piece* may never come: an answer does not open
    # with whitespace, and a random model may write nothing else), while the others are prefilled
    deadline = time.monotonic() + 30
    while not streams[0]._job.steering.generated and time.monotonic() < deadline:
        time.sleep(0.001)
    later = [chunked.stream(msgs, start=False, **kw) for msgs, kw in rest]
    with chunked.scheduler._cond:  # admitted in one round
        for stream in later:
            stream.start()
    streams += later
    assert [s.consume().token_ids for s in streams] == alone
    stats = chunked.scheduler.stats
    assert stats["shared_prefills"] >= 1
    if family == "paligemma":  # its prompts attend both ways throughout: each group in one piece
        assert stats["prefill_chunks"] <= 1 + len(alone), stats
    else:
        assert stats["prefill_chunks"] > 2 * len(alone), stats


@pytest.mark.parametrize("chunk", [None, 32])
def test_a_running_stream_advances_while_a_long_prompt_is_prefilled(fresh, chunk):
    model, processor = fresh("qwen2_vl")
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=(), batching=BatchingConfig(prefill_chunk_tokens=chunk))
    long_msgs = user_turn("Tell me everything about this picture. " * 30, gradient_image())
    solo = engine.generate(long_msgs, max_new_tokens=5).token_ids
    scheduler = engine.scheduler
    during: list[bool] = []  # per decode step: was the long prompt being prefilled?
    running = engine.stream(user_turn("Describe.", stripes_image()), max_new_tokens=400)
    next(running)
    scheduler.on_step = lambda _rows: during.append(bool(scheduler._groups))
    try:
        long = engine.stream(long_msgs, max_new_tokens=5)
        assert long.consume().token_ids == solo
    finally:
        scheduler.on_step = None
        running.close()
    prompt = long._job.prompt_len
    if chunk is None:
        assert sum(during) == 0  # one forward: the running stream waited for all of it
    else:
        # two rows (real and noised view) of `prompt` tokens, 16 columns a chunk: a step after each chunk
        assert sum(during) >= prompt // (chunk // 2) - 1, (sum(during), prompt)


def test_a_request_cancelled_during_its_prefill_leaves_the_group(fresh, monkeypatch):
    from safecode_guard.engine import adapters

    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", batching=BatchingConfig(prefill_chunk_tokens=CHUNK))
    stay_msgs, leave_msgs = user_turn("Describe the image.", gradient_image()), user_turn("What is this?", stripes_image())
    alone = engine.generate(stay_msgs, max_new_tokens=6).token_ids
    leave = engine.stream(leave_msgs, max_new_tokens=6, start=False)
    stay = engine.stream(stay_msgs, max_new_tokens=6, start=False)
    sizes: list[int] = []
    real_chunk = adapters.Decoder.run_chunk

    def chunk_and_cancel(self, prefill, end):
        sizes.append(prefill.size)
        if len(sizes) == 2:
            leave.close()  # the reader leaves after the group's second chunk
        return real_chunk(self, prefill, end)

    monkeypatch.setattr(adapters.Decoder, "run_chunk", chunk_and_cancel)
    with engine.scheduler._cond:
        leave.start()
        stay.start()
    assert stay.consume().token_ids == alone
    assert leave._job.status == "cancelled" and leave._job.steering.t == 0
    assert sizes[0] == 4 and sizes[-1] == 2, sizes  # its two rows left the prefill at the next chunk


def test_judge_prefills_of_a_cancelled_request_are_dropped_queued_or_mid_prefill(fresh, monkeypatch):
    from safecode_guard.control import RequestControl, use_control
    from safecode_guard.engine import adapters

    model, processor = fresh("llava")
    engine = SafeCoDe(model, processor, judge="fixed:safe", batching=BatchingConfig(prefill_chunk_tokens=CHUNK))
    scheduler = engine.scheduler
    prompts = [(template_prompt(processor, f"{long_text('llava')} Part {i}.", False), []) for i in range(3)]
    chunks: list[int] = []
    control = RequestControl()
    real_chunk = adapters.Decoder.run_chunk

    def chunk_and_cancel(self, prefill, end):
        chunks.append(prefill.size)
        control.cancel()  # the request goes away after its prompts' first chunk
        return real_chunk(self, prefill, end)

    monkeypatch.setattr(adapters.Decoder, "run_chunk", chunk_and_cancel)
    # queued several at once (as a guard judge queues its prompts), then cancelled: never prefilled
    queued = RequestControl()
    with use_control(queued), scheduler._cond:
        futures = scheduler.submit_prefills(processor, prompts)
        queued.cancel()
    concurrent.futures.wait(futures, timeout=60)
    assert all(f.cancelled() for f in futures) and chunks == []

    # cancelled mid-prefill: the prompts leave at the next turn instead of being prefilled to the end
    with use_control(control):
        futures = scheduler.submit_prefills(processor, prompts)
    concurrent.futures.wait(futures, timeout=60)
    assert all(f.cancelled() for f in futures)
    assert len(chunks) == 1, chunks  # of the dozens a whole prefill of these prompts takes


# -- images encoded once per request ---------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen3_vl", "idefics3", "gemma3"])
def test_the_self_judge_and_the_answer_share_the_real_images_features(fresh, family):
    msgs = user_turn("How do I get closer to the edge?", gradient_image(48, 40))
    reused = SafeCoDe(*fresh(family))  # judge="self"
    before = dict(reused.scheduler.stats)
    answer = reused.generate(msgs, max_new_tokens=8)
    stats = reused.scheduler.stats
    # the judge encodes the real view; the answer reuses it and encodes only the noised view
    assert stats["image_encodings"] - before.get("image_encodings", 0) == 2
    assert stats["image_cache_hits"] - before.get("image_cache_hits", 0) >= 1  # (a judge rescored alone hits too)
    reused.scheduler.clear_image_cache()
    assert reused.generate(msgs, max_new_tokens=8).token_ids == answer.token_ids
    assert stats["image_encodings"] - before.get("image_encodings", 0) == 4  # forgotten: encoded again

    separate = SafeCoDe(*fresh(family), batching=BatchingConfig(image_cache_mb=0))
    expected = separate.generate(msgs, max_new_tokens=8)
    assert separate.scheduler.stats["image_encodings"] >= 3 and separate.scheduler.stats["image_cache_hits"] == 0
    assert answer.token_ids == expected.token_ids
    assert answer.verdict.unsafe_score == expected.verdict.unsafe_score


def test_the_feature_cache_keeps_the_most_recent_within_its_budget():
    def features(n: int) -> ImageFeatures:
        return ImageFeatures(torch.zeros(n, 256), (), object, True)  # n KiB

    cache = FeatureCache(budget_mb=10 / 1024)  # 10 KiB
    cache.put("a", features(4))
    cache.put("b", features(4))
    assert cache.get("a") is not None  # now the most recent
    cache.put("c", features(4))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", features(11))  # larger than the whole budget: never kept
    assert cache.get("huge") is None and cache.nbytes == 8 * 1024


def test_prefill_settings_are_validated():
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        BatchingConfig(prefill_chunk_tokens=4)
    with pytest.raises(ValueError, match="image_cache_mb"):
        BatchingConfig(image_cache_mb=-1)
