"""`SafeCoDe`: safety-aware contrastive decoding around a loaded HF vision-language model.

Input flow: chat messages -> `parse_messages` (images decoded and checked)
-> the judge's verdict -> one noised copy of every image -> one processor
call for the two views -> one batched prefill.

Decoding: for the first `steered_steps` tokens both rows advance together
and the next token comes from `contrast` + `modulate` (or a refusal prefix);
then the noised row leaves the KV cache and the real row decodes on alone,
without a new prefill and without running the vision tower again.

Output flow: token ids -> incremental text with stop strings held back ->
`SafeCoDeResult` (or text pieces from `stream`).
"""

from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from . import ops
from .adapters import Decoder, detect_quirks, encode_views
from .config import InputPolicy, SafeCoDeConfig
from .errors import (
    InputLimitError,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from .prompting import Conversation, parse_messages, render_prompt
from .verdict import Verdict

__all__ = ["SafeCoDe", "SafeCoDeResult", "SafeCoDeStream", "Usage"]

# One lock per loaded model, shared by every engine built on it: the model keeps
# per-call state (e.g. M-RoPE deltas) that two decodes must never interleave.
_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def _model_lock(model: Any) -> threading.RLock:
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock

FinishReason = Literal["stop", "length"]

#: Most token ids one request's `logit_bias` may name (OpenAI's limit too).
MAX_LOGIT_BIAS = 300


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SafeCoDeResult(BaseModel):
    """One answer: text, new token ids, the verdict that steered it, and accounting."""

    model_config = ConfigDict(frozen=True)

    text: str
    """The answer only (no prompt echo), cut before any stop string."""
    token_ids: list[int]
    """The new tokens, including a final EOS token if one ended the answer."""
    verdict: Verdict | None
    """The verdict that steered decoding; None for `baseline()` answers."""
    finish_reason: FinishReason
    """"stop" for EOS or a stop string, "length" for `max_new_tokens`."""
    usage: Usage
    timings: dict[str, float]
    """Seconds: judge_s, prefill_s, decode_s, total_s."""
    refused: bool
    """Whether the answer opens with a refusal phrase."""


def _penalized(scores: torch.Tensor, sampling: ops.Sampling, counts: Mapping[int, int]) -> torch.Tensor:
    if not sampling.penalized:
        return scores
    return ops.penalize(
        scores, counts, sampling.presence_penalty, sampling.frequency_penalty, sampling.logit_bias
    )


class _TextTracker:
    """Turns new token ids into text pieces, holding back what might start a stop string.

    Decoding the whole answer each time keeps multi-byte characters intact;
    answers are short enough that this costs microseconds.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""  # half a multi-byte character: wait for the rest
        self.text = text
        safe_end = len(text)
        for s in self.stop:
            # search only where a new match can begin: the unemitted tail
            hit = text.find(s, max(0, self.emitted - len(s) + 1))
            if hit != -1:
                self.text, safe_end, self.stopped = text[:hit], hit, True
                break
        if not self.stopped:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe_end = min(safe_end, len(text) - k)
                        break
        piece = self.text[self.emitted : safe_end] if safe_end > self.emitted else ""
        self.emitted = max(self.emitted, safe_end)
        return piece

    def flush(self) -> str:
        """At the end nothing more can complete a stop string: release what was held."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


class SafeCoDeStream:
    """Iterator of text pieces. `verdict` is known on creation; `result` once iteration ends."""

    def __init__(self, verdict: Verdict | None, pieces: Iterator[str]) -> None:
        self.verdict = verdict
        self.result: SafeCoDeResult | None = None
        self._pieces = pieces

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def consume(self) -> SafeCoDeResult:
        """Run to the end and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class SafeCoDe:
    """Safety-aware contrastive decoding for one loaded vision-language model.

    >>> engine = SafeCoDe(model, processor, judge="self")
    >>> result = engine.generate([{"role": "user", "content": [
    ...     {"type": "image", "image": img}, {"type": "text", "text": "How do I run faster here?"}]}])
    >>> result.verdict.label, result.text

    Calls are serialised by a lock per model (the model keeps per-call state
    such as M-RoPE deltas), so engines and threads may share one model.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: SafeCoDeConfig | None = None,
        judge: Any = "self",
        policy: InputPolicy | None = None,
        model_name: str | None = None,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        """`eos_token_ids` replaces the end tokens read from the model and tokenizer
        (an empty tuple decodes to `max_new_tokens` or a stop string)."""
        from .judges import SelfJudge, make_judge

        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = config or SafeCoDeConfig()
        self.policy = policy or InputPolicy()
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        judge_impl = make_judge(judge)
        if isinstance(judge_impl, SelfJudge) and judge_impl.engine is None:
            judge_impl = judge_impl.bind(self)
        self.judge_impl = judge_impl
        self._untimed_config = self.config.model_copy(update={"judge_timeout_s": None})
        self.quirks = detect_quirks(model)
        self._lock = _model_lock(model)
        self._refusal_seqs = ops.refusal_sequences(self.tokenizer, self.config.refusal_phrases)
        self._eos_ids = self._find_eos_ids() if eos_token_ids is None else frozenset(eos_token_ids)
        self._specials = self._find_special_strings()
        self.context_length = self._find_context_length()
        self._vocab_size = self._find_vocab_size()

    # -- construction helpers ---------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        config: SafeCoDeConfig | None = None,
        judge: Any = "self",
        policy: InputPolicy | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        **model_kwargs: Any,
    ) -> SafeCoDe:
        """Load with `AutoModelForImageTextToText` + `AutoProcessor` (local folder or hub id).

        The source is checked first (`loading.check_model_source`): a missing
        folder, a text-only checkpoint or an unreachable hub id fails at once
        with `ModelNotFoundError` / `UnsupportedModelError`.
        """
        from .loading import load_pretrained

        if dtype is not None:
            model_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        model, processor = load_pretrained(path_or_id, **model_kwargs)
        if device is not None:
            model = model.to(device)
        return cls(model, processor, config=config, judge=judge, policy=policy, model_name=str(path_or_id))

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def _find_special_strings(self) -> tuple[str, ...]:
        specials = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(self.tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added.content))
        for attr in ("image_token", "boi_token", "eoi_token", "video_token"):
            value = getattr(self.processor, attr, None)
            if isinstance(value, str):
                specials.add(value)
        return tuple(sorted(specials))

    def _find_vocab_size(self) -> int:
        """Rows of the logits (the output embedding), which may exceed the tokenizer's size."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return int(head.weight.shape[0]) if head is not None else len(self.tokenizer)

    def _find_context_length(self) -> int | None:
        text_config = self.model.config.get_text_config()
        value = getattr(text_config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    # -- public API ---------------------------------------------------------------------

    def judge(self, messages: Sequence[Mapping[str, Any]]) -> Verdict:
        """The judge's verdict for `messages`, without generating an answer."""
        return self._judge(parse_messages(messages, self.policy))

    def generate(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> SafeCoDeResult:
        """Answer `messages` with SafeCoDe. Keyword arguments as in `stream`."""
        return self.stream(messages, **kwargs).consume()

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        verdict: Verdict | str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
    ) -> SafeCoDeStream:
        """Stream the SafeCoDe answer as text pieces; the verdict is decided before the first.

        `verdict` ("safe", "unsafe" or a `Verdict`) overrides the judge. `seed`
        seeds sampling; without one every sampled call draws fresh randomness.
        The image noise always uses `config.seed`, so the same request sees the
        same noised view. `presence_penalty`, `frequency_penalty` (-2..2) and
        `logit_bias` (token id -> -100..100) work as in OpenAI's API, on the
        answer's own tokens; the forced refusal opening of `unsafe_mode="prefix"`
        is exempt (a safety decision is not a sampling preference).
        `tools` (OpenAI-format function schemas) go to the chat template's
        `tools=`; `answer_prefix` is appended to the prompt as the start of the
        answer (it is not part of the returned text), e.g. to open a tool call.
        """
        sampling = self._check_generation_args(
            max_new_tokens, do_sample, temperature, top_p, top_k, presence_penalty, frequency_penalty, logit_bias
        )
        stops = self._check_stop(stop)
        conv = parse_messages(messages, self.policy)
        t0 = time.perf_counter()
        final = self._override(verdict) if verdict is not None else self._judge(conv)
        judge_s = time.perf_counter() - t0
        return self._open(conv, final, sampling, max_new_tokens, stops, seed, judge_s, True, tools, answer_prefix)

    def baseline(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
    ) -> SafeCoDeResult:
        """Plain decoding of the same prompt: no judge, no contrast, no modulation."""
        sampling = self._check_generation_args(
            max_new_tokens, do_sample, temperature, top_p, top_k, presence_penalty, frequency_penalty, logit_bias
        )
        stops = self._check_stop(stop)
        conv = parse_messages(messages, self.policy)
        return self._open(conv, None, sampling, max_new_tokens, stops, seed, 0.0, False).consume()

    # -- helpers the self judge uses ---------------------------------------------------------

    def next_token_logits(self, messages: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Logits `(V,)` (float32, CPU) for the first token of the assistant's answer: one prefill."""
        conv = parse_messages(messages, self.policy)
        with self._lock:
            decoder, _ = self._prefill(conv, [list(conv.images)] if conv.images else [])
            logits = decoder.last_logits[0].float().cpu()
            decoder.release()
        return logits

    def plain_text(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 64) -> str:
        """Greedy plain decoding of `messages` (used for captions): no judge, no SafeCoDe."""
        return self.baseline(messages, max_new_tokens=max_new_tokens).text

    # -- internals --------------------------------------------------------------------------

    def _check_generation_args(
        self,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float | None,
        top_p: float | None,
        top_k: int | None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
    ) -> ops.Sampling:
        limit = self.policy.max_new_tokens_limit
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
            raise InputLimitError(
                f"`max_new_tokens` (={max_new_tokens!r}) must be an integer from 1 to {limit}. "
                "Ask for fewer tokens or raise `InputPolicy.max_new_tokens_limit`."
            )
        if temperature is not None and not (isinstance(temperature, (int, float)) and 0.0 < temperature <= 100.0):
            raise SafeCoDeInputError(
                f"`temperature` (={temperature!r}) has to be a strictly positive float up to 100. "
                "If you're looking for greedy decoding, set `do_sample=False`."
            )
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
            raise SafeCoDeInputError(f"`top_p` (={top_p!r}) must be in (0, 1]. Use 1.0 to turn nucleus sampling off.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise SafeCoDeInputError(f"`top_k` (={top_k!r}) must be a non-negative integer. Use 0 to turn it off.")
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and -2.0 <= value <= 2.0
            ):
                raise SafeCoDeInputError(f"`{name}` (={value!r}) must be a number from -2.0 to 2.0, as in OpenAI's API; 0 turns it off.")
        return ops.Sampling(
            bool(do_sample),
            temperature,
            top_k,
            top_p,
            presence_penalty=presence_penalty or 0.0,
            frequency_penalty=frequency_penalty or 0.0,
            logit_bias=self._check_logit_bias(logit_bias),
        )

    def _check_logit_bias(self, logit_bias: Mapping[int | str, float] | None) -> dict[int, float]:
        """`logit_bias` with integer keys, each a token id of this model and each bias in -100..100."""
        if logit_bias is None:
            return {}
        if not isinstance(logit_bias, Mapping):
            raise SafeCoDeInputError(
                f"`logit_bias` must map token ids to biases, e.g. {{1234: -100}}; got a {type(logit_bias).__name__}."
            )
        if len(logit_bias) > MAX_LOGIT_BIAS:
            raise InputLimitError(f"`logit_bias` holds {len(logit_bias)} tokens; at most {MAX_LOGIT_BIAS} are allowed.")
        vocab = self._vocab_size
        out: dict[int, float] = {}
        for key, bias in logit_bias.items():
            token = int(key) if isinstance(key, int) and not isinstance(key, bool) else (
                int(key) if isinstance(key, str) and key.strip().isdigit() else None
            )
            if token is None or not 0 <= token < vocab:
                raise SafeCoDeInputError(
                    f"`logit_bias` key {key!r} is not a token id of this model (0 to {vocab - 1}). "
                    "Use the tokenizer's ids, e.g. tokenizer.encode(' yes', add_special_tokens=False)."
                )
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
                raise SafeCoDeInputError(f"`logit_bias[{key!r}]` (={bias!r}) must be a number from -100 to 100.")
            out[token] = float(bias)
        return out

    @staticmethod
    def _check_stop(stop: Sequence[str] | str | None) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else list(stop)
        bad = [s for s in stops if not isinstance(s, str)]
        if bad:
            raise SafeCoDeInputError(f"`stop` must hold strings; got {bad[0]!r}. Use e.g. stop=['\\n\\n'].")
        if len(stops) > 32:
            raise InputLimitError(f"`stop` holds {len(stops)} strings; at most 32 are allowed.")
        return [s for s in stops if s]

    def _override(self, verdict: Verdict | str) -> Verdict:
        if isinstance(verdict, Verdict):
            return verdict.model_copy(update={"source": "override"})
        if verdict in ("safe", "unsafe"):
            return Verdict(label=verdict, judge="override", source="override")
        raise SafeCoDeInputError(
            f'`verdict` (={verdict!r}) must be "safe", "unsafe" or a Verdict; leave it None to ask the judge.'
        )

    def _judge(self, conv: Conversation) -> Verdict:
        from .judges import JudgeRequest, SelfJudge, _judge_name, handed_off_verdict, run_judge

        request = JudgeRequest(
            images=conv.images,
            request=conv.request,
            conversation=conv.messages,
            threshold=self.config.threshold,
        )
        judge = self.judge_impl
        handed = handed_off_verdict(request, _judge_name(judge))
        if handed is not None:
            return handed  # the same judge already decided this very request upstream (e.g. a rail)
        if isinstance(judge, SelfJudge) and judge.engine is self:
            # The self judge is our own model's forward pass: run it in this thread under
            # the model lock, so time spent queueing behind other requests never counts
            # as a judge timeout (and a worker thread cannot wait on a lock we hold).
            with self._lock:
                return run_judge(judge, request, self._untimed_config)
        return run_judge(judge, request, self.config)

    def _prefill(
        self,
        conv: Conversation,
        views: list[list[Any]],
        max_new_tokens: int | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
    ) -> tuple[Decoder, int]:
        """Render, encode, check the length, prefill; returns the decoder and the prompt length."""
        if self.quirks.requires_image and not views:
            raise UnsupportedContentError(
                f"{type(self.model).__name__} needs an image in every request; this one has none. "
                "Add an image, or use a model with a text-only path for plain chat turns."
            )
        prompt = render_prompt(self.processor, conv.messages, self._specials, tools=tools) + answer_prefix
        batch = encode_views(self.processor, prompt, views)
        prompt_len = int(batch["input_ids"].shape[1])
        limit = self.policy.max_prompt_tokens
        if limit is not None and prompt_len > limit:
            raise InputLimitError(
                f"The prompt is {prompt_len} tokens; the limit is {limit}. "
                "Shorten the conversation, send fewer or smaller images, or raise `InputPolicy.max_prompt_tokens`."
            )
        if max_new_tokens is not None:
            self._check_length(prompt_len, max_new_tokens)
        batch = batch.to(self.model.device)
        # pixel values follow the model's dtype (e.g. bf16); integer tensors stay as they are
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                batch[key] = value.to(self.model.dtype)
        decoder = Decoder(self.model, self.quirks)
        try:
            decoder.prefill(batch)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            # Inputs the processor accepted but the model cannot take (e.g. more images per
            # prompt than it was built for). Nothing is left half-done: the next call prefills afresh.
            decoder.release()
            raise UnsupportedContentError(
                f"{type(self.model).__name__} could not process this request ({len(conv.images)} image(s), "
                f"{prompt_len} prompt tokens): {type(exc).__name__}: {str(exc).rstrip('.')}. Check that the model supports "
                "this many images per request."
            ) from exc
        return decoder, prompt_len

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.context_length is not None and prompt_len + max_new_tokens > self.context_length:
            raise InputLimitError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens. Shorten the conversation or ask for fewer new tokens."
            )

    def _open(
        self,
        conv: Conversation,
        verdict: Verdict | None,
        sampling: ops.Sampling,
        max_new_tokens: int,
        stop: list[str],
        seed: int | None,
        judge_s: float,
        steered: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
    ) -> SafeCoDeStream:
        """A stream over `_run`: its text pieces pass through, its final item becomes `.result`."""
        run = self._run(
            conv, verdict, sampling, max_new_tokens, stop, seed, judge_s, steered=steered,
            tools=tools, answer_prefix=answer_prefix,
        )
        stream = SafeCoDeStream(verdict, iter(()))

        def pieces() -> Iterator[str]:
            for item in run:
                if isinstance(item, SafeCoDeResult):
                    stream.result = item
                else:
                    yield item

        stream._pieces = pieces()
        return stream

    def _run(
        self,
        conv: Conversation,
        verdict: Verdict | None,
        sampling: ops.Sampling,
        max_new_tokens: int,
        stop: list[str],
        seed: int | None,
        judge_s: float,
        steered: bool,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
    ) -> Iterator[Any]:
        """The decoding loop. Yields text pieces, then the `SafeCoDeResult`."""
        cfg = self.config
        window = cfg.steered_steps if steered else 0
        contrastive = window > 0 and bool(conv.images)
        views: list[list[Any]] = [list(conv.images)] if conv.images else []
        if contrastive:
            noise = torch.Generator().manual_seed(cfg.seed)
            views.append([ops.noised_image(img, cfg.noise_std, noise) for img in conv.images])

        with self._lock:
            t_start = time.perf_counter()
            decoder, prompt_len = self._prefill(conv, views, max_new_tokens, tools, answer_prefix)
            logits = decoder.last_logits
            t_prefill = time.perf_counter()
            gen = torch.Generator(device=logits.device).manual_seed(secrets.randbits(63) if seed is None else seed)
            counts: dict[int, int] = {}
            tracker = _TextTracker(self.tokenizer, stop)
            label = verdict.label if verdict is not None else "safe"
            forced: list[int] = []
            finish: FinishReason = "length"
            try:
                for t in range(max_new_tokens):
                    z_real = logits[0].float()
                    if forced:
                        token = forced.pop(0)
                    elif t < window:
                        z_cd = ops.contrast(z_real, logits[1].float() if contrastive else None, cfg.alpha, cfg.plausibility_beta)
                        if t == 0 and label == "unsafe" and cfg.unsafe_mode == "prefix":
                            # open the answer with the likeliest refusal phrase, whole
                            token, *forced = ops.choose_refusal_prefix(z_cd, self._refusal_seqs)
                        else:
                            r_t = ops.refusal_continuations(self._refusal_seqs, tracker.ids)
                            scores = ops.modulate(z_cd, r_t, label, cfg.unsafe_mode, cfg.lambda_boost, cfg.lambda_supp)
                            token = ops.select_token(_penalized(scores, sampling, counts), sampling, gen)
                    else:
                        token = ops.select_token(_penalized(z_real, sampling, counts), sampling, gen)
                    counts[token] = counts.get(token, 0) + 1

                    piece = tracker.add(token)
                    if piece:
                        yield piece
                    if token in self._eos_ids or tracker.stopped:
                        finish = "stop"
                        break
                    if t + 1 == max_new_tokens:
                        break
                    if contrastive and t + 1 == window:
                        decoder.keep([0])  # the window is over: the noised row leaves the cache
                        contrastive = False
                    rows = 2 if contrastive else 1
                    logits = decoder.step(torch.full((rows,), token, dtype=torch.long, device=logits.device))
                tail = tracker.flush()
                if tail:
                    yield tail
            finally:
                decoder.release()
            t_end = time.perf_counter()

        n_new = len(tracker.ids)
        yield SafeCoDeResult(
            text=tracker.text,
            token_ids=list(tracker.ids),
            verdict=verdict,
            finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_len, completion_tokens=n_new, total_tokens=prompt_len + n_new),
            timings={
                "judge_s": judge_s,
                "prefill_s": t_prefill - t_start,
                "decode_s": t_end - t_prefill,
                "total_s": judge_s + (t_end - t_start),
            },
            refused=ops.opens_with_refusal(tracker.text, cfg.refusal_phrases),
        )
