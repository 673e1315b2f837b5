"""Grammars compiled for one tokenizer, and the per-request state that masks each step's logits.

`GrammarCompiler` (one per engine: one tokenizer, one set of end tokens)
turns a `Constraint`'s grammar text into an llguidance matcher, once per
grammar: the compiled matcher is kept (LRU) and every request starts from a
copy of it. `RowConstraint` is one request's state: `apply` sets the logits of
tokens the grammar does not allow next to -inf, `accept` advances the grammar
by the token actually chosen, and `done` says the grammar is complete (only an
end token could follow).

llguidance is chosen over xgrammar and outlines-core (issue 20; measured on
these CPUs with a 49k byte-level BPE vocabulary and a JSON schema): its mask
costs 0.07-0.09 ms per token against xgrammar's 0.2 ms, a schema compiles in
about 1 ms (xgrammar ~8 ms), it has no dependencies (xgrammar pulls triton
and tvm-ffi), and it reads Hugging Face fast tokenizers directly (byte-level
BPE and SentencePiece-style byte-fallback vocabularies alike). Its torch
helper `apply_token_bitmask_inplace` is not used: it runs `torch.compile` on
first use (1-15 s); unpacking the bitmask with numpy costs microseconds.

llguidance is an optional dependency (`pip install 'safecode-guard[constrained]'`),
imported on the first constrained request.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..errors import SafeCoDeError, UnsupportedModelError, UnsupportedSchemaError
from .grammar import Constraint

__all__ = ["GrammarCompiler", "RowConstraint", "schema_error", "unpack_bitmask"]

#: Compiled grammars one engine keeps (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 128

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[[^\]]*\])")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_POSITION = re.compile(r"^at \d+\(\d+\): ")


def unpack_bitmask(words: bytes, vocab_size: int) -> torch.Tensor:
    """llguidance's bitmask (bit `i % 32` of 32-bit word `i // 32` allows token i) -> bool `(vocab_size,)`.

    Tokens past the mask's end (a model head wider than its tokenizer) are not allowed.
    """
    bits = np.unpackbits(np.frombuffer(words, dtype=np.uint8), bitorder="little").view(bool)
    if bits.shape[0] >= vocab_size:
        return torch.from_numpy(bits[:vocab_size].copy())
    out = torch.zeros(vocab_size, dtype=torch.bool)
    out[: bits.shape[0]] = torch.from_numpy(bits.copy())
    return out


def schema_error(message: str, kind: str) -> UnsupportedSchemaError:
    """llguidance's compile error -> a typed error naming the unsupported keyword(s) and the fix."""
    first = _POSITION.sub("", message.strip().splitlines()[0] if message.strip() else "unknown error")
    keywords: tuple[str, ...] = ()
    if m := _UNIMPLEMENTED.search(message):
        keywords = tuple(json.loads(m.group(1)))
    elif m := _UNKNOWN_FORMAT.search(message):
        keywords = ("format",)
    what = "tool's parameter schema" if kind == "tool_call" else "JSON schema"
    if keywords:
        named = ", ".join(f"`{k}`" for k in keywords)
        return UnsupportedSchemaError(
            f"The {what} uses {named}, which constrained decoding does not support ({first}). "
            f"Remove {named} from the schema (validate that part after decoding instead), or ask for "
            "unconstrained output (e.g. method='function_calling' without strict, or no response_format).",
            keywords,
        )
    return UnsupportedSchemaError(
        f"The {what} cannot be compiled into a decoding grammar: {first}. Fix the schema (e.g. a `$ref` "
        "must point inside it, a `pattern` must be a regex without look-around).",
        keywords,
    )


class GrammarCompiler:
    """Compiles `Constraint` grammars for one tokenizer and keeps them, so a schema compiles once.

    `eos_ids` are the tokens that end an answer: the grammar allows them once
    it is complete. Thread-safe (requests are prepared in their callers' threads).
    """

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_ids)
        self.vocab_size = vocab_size
        self.stats = {"hits": 0, "misses": 0, "compile_s": 0.0, "mask_s": 0.0, "masked_tokens": 0}
        """Compiles and cache hits, seconds compiling, and seconds spent masking (`mask_s`) over
        `masked_tokens` tokens of every row started here (the benchmark reads them)."""
        self._ll_tokenizer: Any = None
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._compiling = threading.Lock()

    def _tokenizer(self) -> Any:
        """The llguidance view of the tokenizer: built once (about a second for a large vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                try:
                    import llguidance.hf  # optional dependency: only constrained requests need it
                except ImportError as exc:
                    raise UnsupportedModelError(
                        "Constrained decoding (structured output, forced tool calls, response_format) needs "
                        "llguidance: pip install 'safecode-guard[constrained]'."
                    ) from exc
                eos = self.eos_ids or [self.tokenizer.eos_token_id]
                try:
                    self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=[e for e in eos if e is not None])
                except ValueError as exc:
                    raise UnsupportedModelError(
                        f"Constrained decoding needs a fast (Rust) Hugging Face tokenizer; this model's is a "
                        f"{type(self.tokenizer).__name__} ({exc}). Load the processor with use_fast=True."
                    ) from exc
            return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> Any:
        """The compiled matcher for `constraint` (from the cache when seen before); typed error if it cannot compile."""
        with self._lock:
            template = self._cache.get(constraint.grammar)
            if template is not None:
                self._cache.move_to_end(constraint.grammar)
                self.stats["hits"] += 1
                return template
        with self._compiling:  # one compile at a time: a burst of one new schema compiles it once
            with self._lock:
                if (template := self._cache.get(constraint.grammar)) is not None:
                    self.stats["hits"] += 1
                    return template
            return self._compile(constraint)

    def _compile(self, constraint: Constraint) -> Any:
        from llguidance import LLMatcher

        t0 = time.perf_counter()
        grammar = LLMatcher.grammar_from_lark(constraint.grammar)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer())
        if is_error:
            raise schema_error(messages[0] if messages else "", constraint.kind)
        template = LLMatcher(self._tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise schema_error(template.get_error(), constraint.kind)
        with self._lock:
            self.stats["misses"] += 1
            self.stats["compile_s"] += time.perf_counter() - t0
            self._cache[constraint.grammar] = template
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        return template

    def row(self, compiled: Any) -> RowConstraint:
        """A fresh per-request state starting a grammar `compile` returned (a copy: the cached one is untouched)."""
        return RowConstraint(compiled.deep_copy(), self.vocab_size, self.stats)

    def start(self, constraint: Constraint) -> RowConstraint:
        """A fresh per-request state for `constraint` (compiled, or taken from the cache)."""
        return self.row(self.compile(constraint))


class RowConstraint:
    """One request's place in its grammar: which tokens may come next, advanced token by token.

    Lives in the scheduler's thread with the request's `decoding.Steering`.
    """

    def __init__(self, matcher: Any, vocab_size: int, stats: dict[str, Any] | None = None) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stats = stats if stats is not None else {"mask_s": 0.0, "masked_tokens": 0}

    def allowed(self) -> torch.Tensor:
        """Bool `(vocab_size,)`: the tokens the grammar allows next."""
        return unpack_bitmask(self.matcher.compute_bitmask(), self.vocab_size)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` `(V,)` with every token the grammar does not allow next at -inf."""
        t0 = time.perf_counter()
        allowed = self.allowed()
        if not bool(allowed.any()):
            raise SafeCoDeError(
                f"The grammar allows no next token ({self.matcher.get_error() or 'no token of this model fits it'})."
            )
        out = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        # unlocked: only the scheduler's thread masks, and a lost update would only blur a benchmark figure
        self.stats["mask_s"] += time.perf_counter() - t0
        self.stats["masked_tokens"] += 1
        return out

    def accept(self, token: int) -> None:
        """Advance the grammar by the token chosen (one `apply` allowed). Never raises: it runs in the
        scheduler's bookkeeping; a token that does not fit leaves the matcher in its error state, and
        the next `apply` fails the request with the reason."""
        t0 = time.perf_counter()
        self.matcher.consume_token(token)
        self.stats["mask_s"] += time.perf_counter() - t0

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing but an end token may follow."""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()
