"""The method's pure functions (`ops`) on hand-computed small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from safecode_guard import ops


class CharTokenizer:
    """Encodes each character as its code point: sequences are easy to reason about."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


# -- noise ------------------------------------------------------------------------------


def test_noised_image_follows_the_formula_exactly():
    img = Image.fromarray(np.array([[[0, 128, 255], [10, 20, 30]]], dtype=np.uint8))  # 1x2
    out = ops.noised_image(img, 0.1, torch.Generator().manual_seed(7))
    eps = torch.randn((1, 2, 3), generator=torch.Generator().manual_seed(7))
    x = torch.tensor(np.asarray(img), dtype=torch.float32) / 255
    expected = torch.round(torch.clamp(x + 0.1 * eps, 0, 1) * 255).to(torch.uint8).numpy()
    assert out.size == img.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), expected)


def test_noised_image_is_seeded_and_changes_pixels():
    img = Image.new("RGB", (16, 12), (100, 150, 200))
    a = ops.noised_image(img, 0.1, torch.Generator().manual_seed(0))
    b = ops.noised_image(img, 0.1, torch.Generator().manual_seed(0))
    c = ops.noised_image(img, 0.1, torch.Generator().manual_seed(1))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_noised_image_converts_other_modes_and_clips():
    img = Image.new("L", (4, 4), 255)
    out = ops.noised_image(img, 5.0, torch.Generator().manual_seed(0))
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.min() >= 0 and arr.max() <= 255
    saturated = np.isin(arr, (0, 255)).mean()
    assert saturated > 0.8 and (arr == 0).any()  # huge noise saturates at both ends


# -- contrast ---------------------------------------------------------------------------


def test_contrast_formula():
    z_real = torch.tensor([1.0, 2.0, 3.0])
    z_noised = torch.tensor([1.0, 0.0, 3.0])
    assert torch.allclose(ops.contrast(z_real, z_noised, 0.5), torch.tensor([0.5, 2.0, 1.5]))


def test_contrast_without_noised_view_is_identity_and_a_copy():
    z = torch.tensor([1.0, 2.0, 3.0])
    out = ops.contrast(z, None, 0.3)
    assert torch.equal(out, z) and out is not z


def test_plausibility_cut_uses_real_probabilities():
    # real probs ~ [0.665, 0.245, 0.090]; beta=0.3 keeps tokens with p >= 0.2
    z_real = torch.tensor([2.0, 1.0, 0.0])
    z_noised = torch.tensor([10.0, 0.0, -10.0])  # the contrast alone would favour token 2
    out = ops.contrast(z_real, z_noised, 1.0, plausibility_beta=0.3)
    assert out[2] == -math.inf
    assert torch.isfinite(out[:2]).all()
    assert int(out.argmax()) == 1


# -- refusal set ------------------------------------------------------------------------


def test_refusal_sequences_plain_and_spaced_deduplicated():
    seqs = ops.refusal_sequences(CharTokenizer(), ["ab", "ab", "c"])
    assert seqs == ((97, 98), (32, 97, 98), (99,), (32, 99))


def test_refusal_continuations_follow_the_prefix():
    seqs = ((1, 2, 3), (1, 4), (5,), (6, 1))
    assert ops.refusal_continuations(seqs, []) == [1, 5, 6]
    assert ops.refusal_continuations(seqs, [1]) == [2, 4]
    assert ops.refusal_continuations(seqs, [1, 2]) == [3]
    assert ops.refusal_continuations(seqs, [6]) == [1]
    assert ops.refusal_continuations(seqs, [7]) == []  # not a refusal: nothing is touched
    assert ops.refusal_continuations(seqs, [1, 2, 3]) == []  # refusal finished


# -- modulation -------------------------------------------------------------------------


def test_modulate_safe_suppresses_only_refusal_tokens():
    z = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = ops.modulate(z, [1, 3], "safe", "prefix", lambda_boost=5.0, lambda_supp=0.5)
    assert torch.equal(out, torch.tensor([0.0, 0.5, 2.0, 2.5]))
    assert torch.equal(z, torch.tensor([0.0, 1.0, 2.0, 3.0]))  # input untouched


def test_modulate_unsafe_boost_and_prefix():
    z = torch.tensor([0.0, 1.0, 2.0])
    assert torch.equal(ops.modulate(z, [0], "unsafe", "boost", 2.0, 9.0), torch.tensor([2.0, 1.0, 2.0]))
    assert torch.equal(ops.modulate(z, [0], "unsafe", "prefix", 2.0, 9.0), z)
    assert torch.equal(ops.modulate(z, [], "safe", "boost", 2.0, 9.0), z)


def test_choose_refusal_prefix_by_first_token_and_ties_to_first_listed():
    z = torch.tensor([0.0, 3.0, 1.0, 3.0])
    seqs = ((2, 0), (3, 2, 2), (1,))
    # tokens 3 and 1 tie at the top; (3, 2, 2) is listed before (1,)
    assert ops.choose_refusal_prefix(z, seqs) == (3, 2, 2)
    assert ops.choose_refusal_prefix(z, ((2,), (0, 1))) == (2,)
    with pytest.raises(ValueError, match="sequences"):
        ops.choose_refusal_prefix(z, ())


def test_opens_with_refusal_is_lenient_about_case_space_and_apostrophes():
    phrases = ["I'm sorry", "I cannot"]
    assert ops.opens_with_refusal("  i\u2019m SORRY, no.", phrases)
    assert ops.opens_with_refusal("I cannot do that", phrases)
    assert not ops.opens_with_refusal("Sure, I cannot wait", phrases)
    assert not ops.opens_with_refusal("", phrases)


# -- token selection -----------------------------------------------------------------------


def test_greedy_is_argmax():
    assert ops.select_token(torch.tensor([0.1, 5.0, 2.0]), ops.Sampling(), None) == 1


def test_sampling_is_seeded():
    scores = torch.zeros(50)
    draws = lambda seed: [  # noqa: E731
        ops.select_token(scores, ops.Sampling(True), torch.Generator().manual_seed(seed)) for _ in range(1)
    ]
    assert draws(3) == draws(3)
    many = {ops.select_token(scores, ops.Sampling(True), g) for g in [torch.Generator().manual_seed(0)] for _ in range(40)}
    assert len(many) > 5  # uniform scores really are sampled


def test_top_k_and_top_p_restrict_the_support():
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    top1 = {ops.select_token(scores, ops.Sampling(True, top_k=1), g) for _ in range(30)}
    assert top1 == {0}
    top2 = {ops.select_token(scores, ops.Sampling(True, top_k=2), g) for _ in range(200)}
    assert top2 == {0, 1}
    # probs ~ [0.644, 0.237, 0.087, 0.032]: top_p=0.7 keeps tokens 0 and 1
    nucleus = {ops.select_token(scores, ops.Sampling(True, top_p=0.7), g) for _ in range(300)}
    assert nucleus == {0, 1}
    tiny_p = {ops.select_token(scores, ops.Sampling(True, top_p=0.01), g) for _ in range(30)}
    assert tiny_p == {0}  # at least one token always stays


def test_low_temperature_approaches_greedy():
    scores = torch.tensor([1.0, 1.5, 0.5])
    g = torch.Generator().manual_seed(0)
    assert {ops.select_token(scores, ops.Sampling(True, temperature=0.01), g) for _ in range(30)} == {1}


def test_penalize_follows_openai_definitions():
    z = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ops.penalize(z, {}, 1.0, 1.0) is z  # nothing generated, no bias: untouched
    out = ops.penalize(z, {1: 3, 3: 1}, presence_penalty=0.5, frequency_penalty=0.25)
    assert out.tolist() == [1.0, 2.0 - 0.75 - 0.5, 3.0, 4.0 - 0.25 - 0.5]
    assert ops.penalize(z, {2: 1}, 0.0, 0.0, {0: 10.0, 3: -100.0}).tolist() == [11.0, 2.0, 3.0, -96.0]
    assert z.tolist() == [1.0, 2.0, 3.0, 4.0]  # never in place


# -- the incremental text tracker against a naive one ------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _CharTokenizer:
    """Token i is the character chr(97 + i % 5), except 7 and 8: the two halves of 'é' in UTF-8."""

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(bytes([0xC3]) if i == 7 else bytes([0xA9]) if i == 8 else chr(97 + i % 5).encode() for i in ids)
        return data.decode("utf-8", errors="replace")


@settings(max_examples=400, deadline=None)
@given(
    # at most 15 tokens: garbage bytes are released after MAX_PENDING_TOKENS (16) unmatched tokens
    ids=st.lists(st.sampled_from([0, 1, 2, 3, 4, 7, 8]), max_size=15),
    stops=st.lists(st.text(alphabet="abcdeé", min_size=1, max_size=4), max_size=3),
)
def test_text_tracker_matches_a_naive_decode_cut_at_the_first_stop(ids, stops):
    from safecode_guard.engine.decoding import TextTracker

    tok = _CharTokenizer()
    tracker = TextTracker(tok, stops)
    pieces = []
    for i in ids:
        pieces.append(tracker.add(i))
        if tracker.stopped:
            break
    pieces.append(tracker.flush())
    text = tok.decode(ids[: len(tracker.ids)])  # everything the tracker was given, decoded at once
    hits = [text.find(s) for s in stops if text.find(s) != -1]
    assert "".join(pieces) == tracker.text  # streamed pieces add up to the answer
    assert tracker.stopped == bool(hits)  # it stops exactly when a stop string appears
    if hits:
        assert tracker.text == text[: min(hits)]  # cut before the first one
    else:
        # the same text, except a trailing half character still waiting for its other half
        assert tracker.text == text or (text.endswith("\ufffd") and text.startswith(tracker.text))
