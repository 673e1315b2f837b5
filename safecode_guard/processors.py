"""The verdict modulation as a standard transformers `LogitsProcessor`.

SafeCoDe's second half (boost or suppress refusals for the first K tokens,
from a scene-level verdict) is useful on its own, with any model and plain
`model.generate`, e.g. for text-only models or when the verdict comes from a
rail upstream:

    from safecode_guard.processors import VerdictLogitsProcessor
    proc = VerdictLogitsProcessor(tokenizer, "unsafe")
    model.generate(**inputs, logits_processor=[proc], max_new_tokens=128)

There is no contrast here (that needs the two-view KV cache of `SafeCoDe`),
so for a request without images `SafeCoDe.generate` and `generate` with this
processor choose the same greedy tokens (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LogitsProcessor

from . import ops
from .config import SafeCoDeConfig
from .errors import SafeCoDeInputError
from .verdict import Verdict

__all__ = ["VerdictLogitsProcessor"]


class VerdictLogitsProcessor(LogitsProcessor):
    """Modulates refusal tokens for the first `config.steered_steps` generated tokens.

    Safe: `scores[R_t] -= lambda_supp`. Unsafe, "boost": `scores[R_t] += lambda_boost`.
    Unsafe, "prefix": at the first step the likeliest refusal phrase is chosen
    and then forced token by token (every other token gets -inf).

    The prompt length is taken from the first call (lazy setup, as generate's
    inputs are known only then); call `reset()` before reusing the instance
    for another `generate`.
    """

    def __init__(
        self, tokenizer: Any, verdict: Verdict | str, config: SafeCoDeConfig | None = None
    ) -> None:
        label = verdict.label if isinstance(verdict, Verdict) else verdict
        if label not in ("safe", "unsafe"):
            raise SafeCoDeInputError(f'`verdict` (={verdict!r}) must be "safe", "unsafe" or a Verdict.')
        self.label = label
        self.config = config or SafeCoDeConfig()
        self.sequences = ops.refusal_sequences(tokenizer, self.config.refusal_phrases)
        self.reset()

    def reset(self) -> None:
        """Forget the prompt length and chosen prefixes, for the next `generate` call."""
        self._prompt_len: int | None = None
        self._forced: dict[int, tuple[int, ...]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """`input_ids` `(B, L)`: prompt + tokens so far; `scores` `(B, V)`: next-token scores."""
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        t = input_ids.shape[1] - self._prompt_len
        cfg = self.config
        prefix_mode = self.label == "unsafe" and cfg.unsafe_mode == "prefix"
        if t >= cfg.steered_steps and not (prefix_mode and self._forced):
            return scores
        out = scores.clone()
        for row in range(scores.shape[0]):
            generated = input_ids[row, self._prompt_len :].tolist()
            if prefix_mode:
                if t == 0:
                    self._forced[row] = ops.choose_refusal_prefix(scores[row], self.sequences)
                phrase = self._forced.get(row, ())
                if t < len(phrase) and list(phrase[:t]) == generated:
                    out[row] = torch.full_like(out[row], float("-inf"))
                    out[row, phrase[t]] = 0.0
            else:
                r_t = ops.refusal_continuations(self.sequences, generated)
                out[row] = ops.modulate(
                    scores[row], r_t, self.label, cfg.unsafe_mode, cfg.lambda_boost, cfg.lambda_supp
                )
        return out
