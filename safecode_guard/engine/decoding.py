"""One request's decoding state: which token comes next, and the text it adds.

The scheduler advances many requests in one forward pass; everything that
makes a request *this* request lives here, one object per request, and never
sees the model or the other rows:

- `Steering`: SafeCoDe's window (SPEC section 2). Given the step's logits for
  the request's rows (real view, and the noised view while contrasting), it
  picks the next token with the pure functions of `ops`: contrast, refusal
  modulation or a forced refusal opening, OpenAI penalties, then greedy or
  seeded sampling. After the window it is plain decoding.
- `TextTracker`: token ids to text pieces, incrementally (each step decodes a
  few tokens, not the whole answer), holding back text that might begin a stop
  string and cutting the answer at the first one. Stop strings are bounded in
  number and length (`MAX_STOP_STRINGS`, `MAX_STOP_CHARS`), so a step costs
  the same at token 10 and at token 10,000.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Any, Literal

import torch

from .. import ops
from ..config import SafeCoDeConfig
from ..constrained.matcher import RowConstraint
from ..sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS

__all__ = [
    "MAX_PENDING_TOKENS",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "Steering",
    "StepLogprob",
    "TextTracker",
    "token_logprob",
]


TokenSeq = tuple[int, ...]

#: Tokens a trailing U+FFFD may wait for the rest of its character before it counts as final.
MAX_PENDING_TOKENS = 16


class Steering:
    """SafeCoDe's per-request token choice: the window, then plain decoding.

    `rows` says how many batch rows the request needs for its next step: two
    (real, noised) while the window contrasts an image, else one. `choose`
    takes the logits of those rows (`(rows, V)`) and returns the next token.

    With a `constraint` (structured output, a forced tool call), tokens the
    grammar does not allow are set to -inf in the real row first, so the
    contrast, the refusal modulation, the penalties and sampling all choose
    among allowed tokens only (a disallowed token stays at -inf through each);
    near the end of its budget the constraint may then swap the choice for
    its grammar's way to close in time (`RowConstraint.settle`).
    """

    def __init__(
        self,
        config: SafeCoDeConfig,
        refusal_seqs: Sequence[TokenSeq],
        label: Literal["safe", "unsafe"],
        window: int,
        contrastive: bool,
        sampling: ops.Sampling,
        generator: torch.Generator | None,
        constraint: RowConstraint | None = None,
        *,
        min_tokens: int = 0,
        eos_ids: Collection[int] = (),
        logprobs: int | None = None,
    ) -> None:
        self.config = config
        self.constraint = constraint
        self.refusal_seqs = refusal_seqs
        self.label = label
        self.window = window
        self.contrastive = contrastive and window > 0
        self.sampling = sampling
        self.generator = generator
        self.min_tokens = min_tokens
        self.eos_ids = sorted(eos_ids) if min_tokens else []
        self.want_logprobs = logprobs
        """None: no logprobs; k: each token's log probability and the k likeliest alternatives."""
        self.logprobs: list[StepLogprob] = []
        self._dist: torch.Tensor | None = None
        self.generated: list[int] = []
        self.forced: list[int] = []
        self.counts: dict[int, int] = {}
        self.window_closed_at = 0.0
        """`time.perf_counter()` when the window's last token was accepted (0: not yet); traces read it."""

    @property
    def t(self) -> int:
        return len(self.generated)

    @property
    def rows(self) -> int:
        return 2 if self.contrastive and self.t < self.window else 1

    @property
    def plain_greedy(self) -> bool:
        """The next token is the argmax of the real row: no window, no prefix, no penalties, nothing recorded."""
        return (
            not self.forced
            and self.constraint is None
            and self.t >= self.window
            and not self.sampling.do_sample
            and not self.sampling.penalized
            and self.t >= self.min_tokens
            and self.want_logprobs is None
        )

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this step's logits for the request's rows, shape `(rows, V)`."""
        z_real = logits[0].float()
        if self.forced:
            self._note(z_real)  # a forced refusal token was not drawn: the model's own view at this step
            return self.forced.pop(0)
        if self.constraint is not None:
            z_real = self.constraint.apply(z_real)
            # a budget running short may replace the choice with the grammar's way to close in time
            return self.constraint.settle(self._choose(z_real, logits))
        return self._choose(z_real, logits)

    def _choose(self, z_real: torch.Tensor, logits: torch.Tensor) -> int:
        cfg = self.config
        t = self.t
        if t >= self.window:
            return self._select(z_real)
        z_cd = ops.contrast(z_real, logits[1].float() if self.rows == 2 else None, cfg.alpha, cfg.plausibility_beta)
        if t == 0 and self.label == "unsafe" and cfg.unsafe_mode == "prefix":
            # open the answer with the likeliest refusal phrase, whole
            token, *self.forced = ops.choose_refusal_prefix(z_cd, self.refusal_seqs)
            self._note(z_real)
            return token
        r_t = ops.refusal_continuations(self.refusal_seqs, self.generated)
        return self._select(ops.modulate(z_cd, r_t, self.label, cfg.unsafe_mode, cfg.lambda_boost, cfg.lambda_supp))

    def _select(self, scores: torch.Tensor) -> int:
        s = self.sampling
        if s.penalized:
            scores = ops.penalize(
                scores, self.counts, s.presence_penalty, s.frequency_penalty, s.logit_bias, s.repetition_penalty
            )
        if self.t < self.min_tokens and self.eos_ids:
            scores = scores.clone()
            scores[self.eos_ids] = float("-inf")  # the answer may not end yet
        if self.want_logprobs is not None:
            self._dist = ops.token_distribution(scores, s)
        return ops.select_token(scores, s, self.generator)

    def _note(self, scores: torch.Tensor) -> None:
        if self.want_logprobs is not None:
            self._dist = torch.log_softmax(scores.float(), dim=-1)

    def accept(self, token: int) -> None:
        """Record the token actually emitted (chosen here, or the batch's argmax)."""
        self.generated.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1
        if self._dist is not None:
            self.logprobs.append(token_logprob(self._dist, token, self.want_logprobs or 0))
            self._dist = None
        if self.constraint is not None:
            self.constraint.accept(token)
        if len(self.generated) == self.window:  # one comparison per token
            self.window_closed_at = time.perf_counter()

    @property
    def grammar_done(self) -> bool:
        """The answer's grammar is complete: the answer ends here (no end token needed)."""
        return self.constraint is not None and self.constraint.done


StepLogprob = tuple[int, float, tuple[tuple[int, float], ...]]
"""(token id, its log probability, the k likeliest (id, log probability) pairs of that step)."""


def token_logprob(dist: torch.Tensor, token: int, k: int) -> StepLogprob:
    """`token`'s entry of a step's log-probabilities `dist` (`(V,)`), with the `k` likeliest tokens.

    -inf (a token the warpers dropped) is clamped to -9999.0, OpenAI's floor, so it stays valid JSON."""
    top: tuple[tuple[int, float], ...] = ()
    if k:
        values, ids = torch.topk(dist, min(k, dist.shape[-1]))
        top = tuple((int(i), max(float(v), -9999.0)) for v, i in zip(values.tolist(), ids.tolist(), strict=True))
    return int(token), max(float(dist[token]), -9999.0), top


class TextTracker:
    """Turns new token ids into text pieces, holding back what might start a stop string.

    Incremental detokenisation: each step decodes only the tokens since the
    last piece that was complete (`prefix_offset`), compared with the same
    span without the new token (`read_offset`), so multi-byte characters and
    tokenizers that drop a leading space (SentencePiece) come out right
    without decoding the whole answer every step. Stop strings are searched
    only where a new match can start, and the held-back tail is the longest
    end of the text that begins some stop string.

    `strip_leading` drops whitespace before the answer's first character:
    byte-level BPE vocabularies (Qwen, Gemma) often open an answer with a
    space-prefixed token (" I'm sorry"), which no chat answer should show.
    Off when the answer continues a forced opening (a tool call's start),
    where the text is read together with what comes before it.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], *, strip_leading: bool = True) -> None:
        self.tokenizer = tokenizer
        self.strip_leading = strip_leading
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        # per stop string: its proper prefixes' lengths k (longest first), by their last character
        self._prefix_ends: list[tuple[str, dict[str, list[int]]]] = []
        for s in self.stop:
            ends: dict[str, list[int]] = {}
            for k in range(len(s) - 1, 0, -1):
                ends.setdefault(s[k - 1], []).append(k)
            self._prefix_ends.append((s, ends))
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        pending = len(self.ids) - self._read_offset
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and pending < MAX_PENDING_TOKENS):
            # A token with no text, or part of a multi-byte character: wait for more. Bytes that
            # never become a character (garbage from a random model) are released after
            # MAX_PENDING_TOKENS tokens, so a step never decodes more than that many.
            return ""
        before = len(self.text)
        new = full[len(prefix) :]
        self.text += new.lstrip() if self.strip_leading and not self.text else new
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        safe_end = len(self.text)
        if self.stop:
            start = max(0, before - self._longest + 1)  # a new match must end in the new text
            hits = [h for s in self.stop if (h := self.text.find(s, start)) != -1]
            if hits:
                self.text = self.text[: min(hits)]
                safe_end, self.stopped = len(self.text), True
            else:
                safe_end -= self._held_back()
        piece = self.text[self.emitted : safe_end] if safe_end > self.emitted else ""
        self.emitted = max(self.emitted, safe_end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        if not self.text:
            return 0
        last = self.text[-1]
        best = 0
        for stop, ends in self._prefix_ends:
            for k in ends.get(last, ()):
                if k <= best:
                    break
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end nothing more can complete a stop string: release what was held."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece

