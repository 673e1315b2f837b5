"""Grammars compiled for one tokenizer, and the per-request state that masks each step's logits.

`GrammarCompiler` (one per engine: one tokenizer, one set of end tokens)
turns a `Constraint`'s grammar text into an llguidance matcher, once per
grammar: the compiled matcher is kept (LRU) and every request starts from a
copy of it. `RowConstraint` is one request's state: `apply` sets the logits of
tokens the grammar does not allow next to -inf, `accept` advances the grammar
by the token actually chosen, and `done` says the grammar is complete (only an
end token could follow).

Closing within the budget (`SafeCoDeConfig.close_constrained`, on by
default): a row given its token budget watches, over its last tokens, the
shortest way its grammar can still end (`closing_path`: a cheap greedy walk
on a copy of the matcher that prefers closing quotes and brackets and minimal
values, takes what the grammar forces, and ends with an end token once the
grammar accepts). When the model's own choice would leave less room than
that walk needs, the row follows the walk instead (`RowConstraint.settle`),
so the answer ends as a complete, valid instance rather than being cut by
`max_new_tokens`; `RowConstraint.closed` records that it happened. When even
the walk does not fit, nothing changes: the answer is cut
(`finish_reason="length"`) as without the option.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import SafeCoDeError, UnsupportedModelError, UnsupportedSchemaError
from .grammar import Constraint

__all__ = [
    "CLOSE_WINDOW",
    "CLOSING_TEXTS",
    "Closing",
    "GrammarCompiler",
    "RowConstraint",
    "closing_path",
    "schema_error",
    "unpack_bitmask",
]

#: Compiled grammars one engine keeps (least recently used dropped first).
GRAMMAR_CACHE_SIZE = 128

#: Tokens before the end of its budget at which a row starts checking that it can still close (at
#: least twice the shortest complete answer of its grammar, for large schemas).
CLOSE_WINDOW = 64

#: What a closing walk prefers, first allowed first: an empty string (a string value), the end of a
#: string, of an array, of an object, the separator before a required key (or a required item), then
#: the smallest values of the other types. Inside a string only the closing quote of these can end
#: it (the rest are plain text there), so the quote comes first; the separator comes before the
#: digits, which would otherwise lengthen a number without end.
CLOSING_TEXTS = ('""', '"', "]", "}", ", ", "0", "false", "null", "[]", "{}", "true")

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
        self._closing: Closing | None = None
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

    def row(self, compiled: Any, budget: int | None = None) -> RowConstraint:
        """A fresh per-request state starting a grammar `compile` returned (a copy: the cached one is untouched).

        With a `budget` (the request's `max_new_tokens`) the row closes its answer within it
        (`RowConstraint.settle`); None leaves closing off."""
        closing = self.closing(budget) if budget is not None else None
        return RowConstraint(compiled.deep_copy(), self.vocab_size, self.stats, closing)

    def start(self, constraint: Constraint, budget: int | None = None) -> RowConstraint:
        """A fresh per-request state for `constraint` (compiled, or taken from the cache)."""
        return self.row(self.compile(constraint), budget)

    def closing(self, budget: int) -> Closing:
        """What a row needs to close within `budget` tokens with this tokenizer (built once, then shared)."""
        with self._lock:
            held = self._closing
        if held is None:
            ll = self._tokenizer()
            ids: dict[int, None] = {}
            for text in CLOSING_TEXTS:
                # the text's first token: a whole closing text where the vocabulary has it as one token
                tokens = self.tokenizer.encode(text, add_special_tokens=False)
                if tokens:
                    ids.setdefault(int(tokens[0]))
            lengths = tuple(len(ll.decode_bytes([i])) for i in range(ll.vocab_size))
            held = Closing(tuple(ids), int(ll.eos_token), lengths, budget=0)
            with self._lock:
                self._closing = held
        return Closing(held.prefer, held.eos, held.lengths, budget)


@dataclass(frozen=True)
class Closing:
    """What a row needs to close its answer within its token budget (see the module docstring)."""

    prefer: tuple[int, ...]
    """Token ids a closing walk tries first, in order (`CLOSING_TEXTS`' first tokens)."""
    eos: int
    """The end token a walk ends with once the grammar accepts but could go on."""
    lengths: tuple[int, ...]
    """Bytes of each token: where nothing preferred fits and nothing is forced, a walk takes the
    longest allowed token (the most progress through an enum value, a pattern or a minimum length)."""
    budget: int
    """The request's `max_new_tokens`: the answer's tokens, the end token included."""


def closing_path(matcher: Any, closing: Closing, limit: int) -> list[int] | None:
    """The tokens of a short way to complete `matcher`'s grammar from where it stands, at most `limit`
    of them, or None when this walk needs more (or meets a dead end). `matcher` is not changed.

    Greedy, one step at a time: done when the grammar stops; an end token when it accepts; else the
    first preferred token it allows, else the tokens it forces, else the longest token it allows.
    Not always the shortest path (a key and its value could sometimes share a token), but each step
    is a few microseconds: no mask is computed unless nothing preferred fits and nothing is forced.
    """
    m = matcher.deep_copy()
    path: list[int] = []
    while len(path) <= limit:
        if m.is_error():
            return None
        if m.is_stopped():
            return path
        if m.is_accepting():
            path.append(closing.eos)
            return path if len(path) <= limit else None
        token = next((t for t in closing.prefer if m.validate_tokens([t]) == 1), None)
        if token is None:
            forced = m.compute_ff_tokens()
            if forced:
                m.consume_tokens(forced)
                path += forced
                continue
            allowed = np.flatnonzero(unpack_bitmask(m.compute_bitmask(), len(closing.lengths)).numpy())
            if allowed.size == 0:
                return None
            token = int(max(allowed.tolist(), key=lambda t: (closing.lengths[t], -t)))
        m.consume_token(token)
        path.append(token)
    return None


class RowConstraint:
    """One request's place in its grammar: which tokens may come next, advanced token by token.

    Lives in the scheduler's thread with the request's `decoding.Steering`. With a
    `closing` (its budget) the row also closes its answer in time: `settle`.
    """

    def __init__(
        self, matcher: Any, vocab_size: int, stats: dict[str, Any] | None = None, closing: Closing | None = None
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stats = stats if stats is not None else {"mask_s": 0.0, "masked_tokens": 0}
        self.closing = closing
        self.consumed = 0
        """Tokens accepted so far (the answer's tokens: the row starts with its answer)."""
        self.closed = False
        """Whether the budget ran short and the row followed a closing path (`settle`)."""
        self._path: collections.deque[int] = collections.deque()
        self._window: int | None = None
        self._accepting = False

    def allowed(self) -> torch.Tensor:
        """Bool `(vocab_size,)`: the tokens the grammar allows next (only the next closing token once
        the row follows a closing path)."""
        if self._path:
            only = torch.zeros(self.vocab_size, dtype=torch.bool)
            only[self._path[0]] = True
            return only
        return unpack_bitmask(self.matcher.compute_bitmask(), self.vocab_size)

    def settle(self, token: int) -> int:
        """The token to emit, given the step chose `token`: `token` itself while the answer is complete
        after it or can still close within its budget, else the first token of the closing path from
        here (and the row follows that path from now on). Without a `closing`, or when no path fits, `token`."""
        closing = self.closing
        if closing is None or self._path:
            return token  # a row on its closing path was offered only the path's next token
        t0 = time.perf_counter()
        try:
            left = closing.budget - self.consumed - 1  # tokens the answer may add after this one
            accepting = bool(self.matcher.is_accepting())
            if self._window is None or (self._accepting and not accepting):
                # The shortest completion from the start (and from where a call opens in free text)
                # sizes how early a large schema must start watching; when none fits what is left,
                # closing cannot help this request and is not tried.
                first = closing_path(self.matcher, closing, closing.budget - self.consumed)
                self._window = max(CLOSE_WINDOW, 2 * len(first)) if first is not None else 0
            self._accepting = accepting
            if left >= self._window:
                return token
            after = self.matcher.deep_copy()
            # complete after it (a cut leaves a valid answer: free text under "auto", a finished
            # value), or still able to close in time: the model's choice stands
            if after.consume_token(token) and (after.is_accepting() or closing_path(after, closing, left) is not None):
                return token
            path = closing_path(self.matcher, closing, left + 1)
            if not path:
                return token  # it cannot close in time: the answer is cut at the budget, as without closing
            self._path.extend(path)
            self.closed = True
            return path[0]
        finally:
            self.stats["mask_s"] += time.perf_counter() - t0

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
        self.consumed += 1
        if self._path:
            if self._path[0] == token:
                self._path.popleft()
            else:  # something outside the grammar's choice (a forced token) left the path: drop it
                self._path.clear()
        self.stats["mask_s"] += time.perf_counter() - t0

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing but an end token may follow."""
        return bool(self.matcher.is_stopped()) and not self.matcher.is_error()
