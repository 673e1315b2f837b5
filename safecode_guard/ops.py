"""The SafeCoDe method as small pure functions (SPEC section 2).

Each function takes plain values and tensors and returns new ones; none of
them touches a model. The decoding engine strings them together:

    noised_image       pixel-space Gaussian copy of each image
    contrast           z_cd = z_real - alpha * z_noised (+ optional plausibility cut)
    refusal_sequences  token sequences of the refusal phrases
    refusal_continuations   R_t: the tokens that continue a refusal begun so far
    modulate           push R_t down (safe) or up (unsafe, "boost" mode)
    choose_refusal_prefix   the phrase that opens the answer ("prefix" mode)
    select_token       greedy or temperature / top-k / top-p sampling
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

__all__ = [
    "Sampling",
    "choose_refusal_prefix",
    "contrast",
    "modulate",
    "noised_image",
    "opens_with_refusal",
    "penalize",
    "refusal_continuations",
    "refusal_decision",
    "refusal_sequences",
    "select_token",
    "token_distribution",
    "warp",
]

TokenSeq = tuple[int, ...]


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


# -- 1. the noised view ------------------------------------------------------------


def noised_image(image: Image.Image, noise_std: float, generator: torch.Generator) -> Image.Image:
    """`round(clip(x/255 + noise_std * eps, 0, 1) * 255)` with `eps ~ N(0, 1)` of shape `(H, W, 3)`.

    `generator` is a CPU `torch.Generator`; the engine makes one per request,
    seeded with `config.seed`, and passes the images in message order, so the
    same request always gets the same noise. The result has the input's size.
    """
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32)
    y = torch.round(torch.clamp(x + noise_std * eps, 0.0, 1.0) * 255.0)
    return Image.fromarray(y.to(torch.uint8).numpy(), mode="RGB")


# -- 2. the contrast -----------------------------------------------------------------


def contrast(
    z_real: torch.Tensor,
    z_noised: torch.Tensor | None,
    alpha: float,
    plausibility_beta: float | None = None,
) -> torch.Tensor:
    """Contrastive scores `z_real - alpha * z_noised`, shape `(V,)` in and out.

    With no noised view (a request without images) the real logits pass
    through. With `plausibility_beta`, tokens whose real probability is below
    `beta * max real probability` get `-inf`, so the contrast cannot promote
    tokens the model itself finds implausible.
    """
    z_cd = z_real.clone() if z_noised is None else z_real - alpha * z_noised
    if plausibility_beta is not None:
        # p < beta * p_max  <=>  log p < log beta + log p_max, in log space for stability
        log_p = torch.log_softmax(z_real, dim=-1)
        cut = log_p < (np.log(plausibility_beta) + log_p.max())
        z_cd = z_cd.masked_fill(cut, float("-inf"))
    return z_cd


# -- 3. refusal tokens ----------------------------------------------------------------


def refusal_sequences(tokenizer: _Encoder, phrases: Iterable[str]) -> tuple[TokenSeq, ...]:
    """Every phrase tokenized as `encode(p)` and `encode(" " + p)`, no special tokens.

    Order follows the phrases (plain form first), duplicates dropped; the
    order matters for ties in `choose_refusal_prefix`.
    """
    seqs: dict[TokenSeq, None] = {}
    for phrase in phrases:
        for text in (phrase, " " + phrase):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                seqs[ids] = None
    return tuple(seqs)


def refusal_continuations(sequences: Sequence[TokenSeq], generated: Sequence[int]) -> list[int]:
    """`R_t = { s[t] : s in sequences, len(s) > t, s[:t] == generated[:t] }` with `t = len(generated)`.

    At `t = 0` these are the phrases' first tokens; later only tokens that
    continue a refusal already begun, so common words are left alone.
    """
    t = len(generated)
    prefix = tuple(generated)
    return sorted({s[t] for s in sequences if len(s) > t and s[:t] == prefix})


def modulate(
    z_cd: torch.Tensor,
    refusal_ids: Sequence[int],
    label: Literal["safe", "unsafe"],
    unsafe_mode: Literal["prefix", "boost"],
    lambda_boost: float,
    lambda_supp: float,
) -> torch.Tensor:
    """Verdict-driven modulation of `z_cd` (shape `(V,)`) at the refusal tokens `R_t`.

    safe: `z[R_t] -= lambda_supp`; unsafe with "boost": `z[R_t] += lambda_boost`;
    unsafe with "prefix": unchanged (the prefix itself is chosen at t=0 by
    `choose_refusal_prefix`; later window steps use plain `z_cd`).
    """
    if not refusal_ids or (label == "unsafe" and unsafe_mode == "prefix"):
        return z_cd
    delta = -lambda_supp if label == "safe" else lambda_boost
    out = z_cd.clone()
    idx = torch.as_tensor(list(refusal_ids), dtype=torch.long, device=z_cd.device)
    out[idx] += delta
    return out


def choose_refusal_prefix(z_cd: torch.Tensor, sequences: Sequence[TokenSeq]) -> TokenSeq:
    """The refusal sequence whose first token scores highest under `log_softmax(z_cd)`.

    `z_cd` has shape `(V,)`. Ties go to the sequence listed first (`max`
    keeps the first maximum), which makes the choice deterministic.
    """
    if not sequences:
        raise ValueError("`sequences` is empty: give at least one refusal phrase.")
    log_p = torch.log_softmax(z_cd.float(), dim=-1)
    firsts = torch.as_tensor([s[0] for s in sequences], dtype=torch.long, device=z_cd.device)
    scores = log_p[firsts].tolist()
    best = max(range(len(sequences)), key=lambda i: scores[i])
    return tuple(sequences[best])


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def opens_with_refusal(text: str, phrases: Iterable[str]) -> bool:
    """True when `text`, ignoring leading space, case and curly apostrophes, opens with a phrase."""
    head = text.lstrip().translate(_APOSTROPHES).casefold()
    return any(head.startswith(p.translate(_APOSTROPHES).casefold()) for p in phrases)


def refusal_decision(text: str, phrases: Sequence[str]) -> bool | None:
    """Whether an answer that begins with `text` opens with a refusal phrase; None while undecided.

    Agrees with `opens_with_refusal` on every continuation of `text`:
    True once a phrase is complete, False once no phrase can still match,
    None while `text` (ignoring leading space, case and curly apostrophes)
    is still the start of some phrase.
    """
    head = text.lstrip()
    if not head:
        return None
    if opens_with_refusal(head, phrases):
        return True
    # `opens_with_refusal(p, [head])` asks whether phrase p starts with `head`, normalised alike.
    if any(opens_with_refusal(p, [head]) for p in phrases):
        return None
    return False


# -- 4. OpenAI-style penalties ------------------------------------------------------


def penalize(
    scores: torch.Tensor,
    counts: Mapping[int, int],
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """OpenAI's penalties on `scores` (shape `(V,)`), as the chat-completions API defines them.

    First transformers' `repetition_penalty` `p` on every token already in the
    answer (`z / p` where `z > 0`, `z * p` elsewhere, as its
    `RepetitionPenaltyLogitsProcessor`); then
    `z[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)` for every
    token `j` generated `c[j]` times so far (`counts`, answer tokens only), then
    `z[j] += logit_bias[j]`. Returns `scores` itself when there is nothing to do.
    """
    repeat = bool(counts) and repetition_penalty != 1.0
    if not counts or (presence_penalty == 0.0 and frequency_penalty == 0.0):
        openai_counts: Mapping[int, int] = {}
    else:
        openai_counts = counts
    if not openai_counts and not logit_bias and not repeat:
        return scores
    out = scores.clone()
    if repeat:
        idx = torch.as_tensor(list(counts), dtype=torch.long, device=scores.device)
        seen = out[idx]
        out[idx] = torch.where(seen > 0, seen / repetition_penalty, seen * repetition_penalty)
    if openai_counts:
        idx = torch.as_tensor(list(openai_counts), dtype=torch.long, device=scores.device)
        c = torch.as_tensor(list(openai_counts.values()), dtype=out.dtype, device=scores.device)
        out[idx] -= frequency_penalty * c + presence_penalty
    if logit_bias:
        idx = torch.as_tensor(list(logit_bias), dtype=torch.long, device=scores.device)
        out[idx] += torch.as_tensor(list(logit_bias.values()), dtype=out.dtype, device=scores.device)
    return out


# -- 5. token selection ---------------------------------------------------------------


class Sampling:
    """A request's sampling settings; `do_sample=False` means greedy.

    The penalties (`penalize`) ride along: they shape the scores that
    greedy and sampled selection both read.
    """

    __slots__ = (
        "do_sample", "frequency_penalty", "logit_bias", "min_p", "presence_penalty", "repetition_penalty",
        "temperature", "top_k", "top_p",
    )

    def __init__(
        self,
        do_sample: bool = False,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        *,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
    ) -> None:
        self.do_sample = do_sample
        self.temperature = 1.0 if temperature is None else float(temperature)
        self.top_k = max(top_k or 0, 0)  # -1 (vLLM's "off") and 0 both turn it off
        self.top_p = 1.0 if top_p is None else float(top_p)
        self.min_p = 0.0 if min_p is None else float(min_p)
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.repetition_penalty = 1.0 if repetition_penalty is None else float(repetition_penalty)
        self.logit_bias = dict(logit_bias or {})

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.repetition_penalty != 1.0)

    def __repr__(self) -> str:
        mode = "greedy" if not self.do_sample else (
            f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, min_p={self.min_p}"
        )
        if self.penalized:
            mode += (
                f", presence_penalty={self.presence_penalty}, frequency_penalty={self.frequency_penalty}, "
                f"repetition_penalty={self.repetition_penalty}, logit_bias={len(self.logit_bias)} tokens"
            )
        return f"Sampling({mode})"


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The scores a sampled token is drawn from: temperature, then top-k, then top-p (keeping at
    least one token), then min-p; dropped tokens are -inf. Float32, shape `(V,)`."""
    z = scores.float() / sampling.temperature
    if 0 < sampling.top_k < z.shape[-1]:
        kth = torch.topk(z, sampling.top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True)
        cum = torch.softmax(sorted_z, dim=-1).cumsum(-1)
        # drop a token when the tokens before it already cover top_p; the first always stays
        drop_sorted = (cum - torch.softmax(sorted_z, dim=-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    if sampling.min_p > 0.0:
        probs = torch.softmax(z, dim=-1)
        z = z.masked_fill(probs < sampling.min_p * probs.max(), float("-inf"))  # the likeliest always stays
    return z


def select_token(scores: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Pick the next token from `scores` (shape `(V,)`) the way `generate` would.

    Greedy is an argmax. Sampling draws from `warp(scores)` with `generator`,
    so a seed reproduces the draw.
    """
    if not sampling.do_sample:
        return int(torch.argmax(scores))
    probs = torch.softmax(warp(scores, sampling), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_distribution(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Log-probabilities `(V,)` of the distribution `select_token` picks from: the warped scores when
    sampling, the scores themselves when greedy (their argmax is the pick)."""
    return torch.log_softmax(warp(scores, sampling) if sampling.do_sample else scores.float(), dim=-1)
