"""`SafeCoDe`: safety-aware contrastive decoding around a loaded HF vision-language model.

Input flow (in the caller's thread): chat messages -> `parse_messages`
(images decoded and checked) -> one `Conversation` with the call's tools and
answer opening -> one noised copy of every image -> the prompt rendered from
the conversation and encoded for both views -> every length limit checked ->
the judge's verdict on a `JudgeRequest` made from the same conversation (what
the model reads, text joined as its template joins it) -> a `DecodeJob` for
the model's scheduler. A `constraint` (structured output, a forced tool call)
is compiled before the judge runs and rides in the job's `Steering` as the
request's grammar state, unless the verdict is unsafe (`constrained/`).

Decoding (in the scheduler's thread, `scheduler.py`, batched with every
other request on the model): one prefill of both views (the vision tower runs
once per view; the real view's features come from the self judge's prefill
when it ran, since both prompts show the same images); for the first
`steered_steps` tokens both rows advance and the next token comes from
`contrast` + `modulate` (or a refusal prefix) in `decoding.Steering`; then the
noised row leaves the KV cache and the real row decodes on, without a new
prefill and without running the vision tower again.

Output flow: text pieces (stop strings held back) through the request's own
channel -> `SafeCoDeStream` (iterate it, or `async for` it) ->
`SafeCoDeResult`. Closing a stream, or dropping it, cancels the request: its
rows leave the batch at the next step.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .. import ops
from ..config import BatchingConfig, InputPolicy, SafeCoDeConfig, validated_copy
from ..constrained.grammar import Constraint, ended_by_grammar
from ..constrained.matcher import GrammarCompiler
from ..control import (
    RequestControl,
    arun_briefly,
    checked_timeout,
    checkpoint,
    current_control,
    run_briefly,
)
from ..errors import (
    InputLimitError,
    SafeCoDeInputError,
    UnsupportedContentError,
)
from ..images import image_working_side
from ..judges.factory import make_judge
from ..judges.guard import check_answer as answer_verdict
from ..judges.guard import guard_image_side, load_if_guard, supports_answer_check
from ..judges.request import JudgeRequest, handed_off_verdict, judge_name
from ..judges.runner import run_judge
from ..judges.self_judge import SelfJudge
from ..observability.audit import AuditLog
from ..observability.records import RequestRecord, observed_check
from ..observability.tracing import judge_span, verdict_attributes
from ..prompting import Conversation, parse_messages, render_prompt, special_strings, template_joins
from ..sampling import SamplingParams, sampling_params
from ..verdict import Verdict, validated_verdict
from . import loading
from .adapters import detect_quirks, encode_rows
from .decoding import Steering, TextTracker
from .jobs import DecodeJob
from .registry import scheduler_for
from .results import SafeCoDeResult, SafeCoDeStream
from .scheduler import Scheduler

__all__ = ["SafeCoDe"]




class SafeCoDe:
    """Safety-aware contrastive decoding for one loaded vision-language model.

    >>> engine = SafeCoDe(model, processor, judge="self")
    >>> result = engine.generate([{"role": "user", "content": [
    ...     {"type": "image", "image": img}, {"type": "text", "text": "How do I run faster here?"}]}])
    >>> result.verdict.label, result.text

    Every engine on a model shares the model's scheduler, which decodes
    concurrent calls together (continuous batching; `BatchingConfig` sets its
    limits), so engines, threads and asyncio tasks may all share one model.
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
        batching: BatchingConfig | None = None,
    ) -> None:
        """`eos_token_ids` replaces the end tokens read from the model and tokenizer
        (an empty tuple decodes to `max_new_tokens` or a stop string). `batching`
        sets the limits of the model's scheduler when this engine is the first on
        the model (later engines pass the same or None)."""
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = config or SafeCoDeConfig()
        self.policy = policy or InputPolicy()
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        judge_impl = make_judge(judge)
        if isinstance(judge_impl, SelfJudge) and judge_impl.engine is None:
            judge_impl = judge_impl.bind(self)
        else:
            load_if_guard(judge_impl)  # a guard model loads now, never against judge_timeout_s
        if self.config.check_answer and not supports_answer_check(judge_impl):
            raise SafeCoDeInputError(
                f"`check_answer` needs a judge that classifies answers, a guard judge "
                f"('guard:<folder or hub id>'); this engine's judge is {getattr(judge_impl, 'name', judge_impl)!r}. "
                "Use a guard judge, or set check_answer=False."
            )
        self.judge_impl = judge_impl
        self._untimed_config = validated_copy(self.config, {"judge_timeout_s": None})
        self.quirks = detect_quirks(model)
        self.scheduler: Scheduler = scheduler_for(model, self.quirks, batching)
        self._refusal_seqs = ops.refusal_sequences(self.tokenizer, self.config.refusal_phrases)
        self._eos_ids = self._find_eos_ids() if eos_token_ids is None else frozenset(eos_token_ids)
        self._specials = special_strings(self.processor, self.tokenizer)
        self.context_length = self._find_context_length()
        self._token_chars = self._find_token_chars()
        self._vocab_size = self._find_vocab_size()
        self.grammars = GrammarCompiler(self.tokenizer, self._eos_ids, self._vocab_size)
        """Constraint grammars compiled for this engine's tokenizer, cached per grammar (llguidance loads
        on the first constrained request)."""
        self.image_side = max(image_working_side(processor, self.policy), guard_image_side(self.judge_impl, self.policy))
        """Longest image side worth keeping for this processor (and a guard judge's, which reads the
        same images): images shrink to it on decoding."""
        self.audit_log: AuditLog | None = None
        """Where each request's audit line goes (`safecode_guard.observability.AuditLog`); None: no audit
        line, unless the caller's `request_scope` names a log (the server's does)."""

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
        batching: BatchingConfig | None = None,
        **model_kwargs: Any,
    ) -> SafeCoDe:
        """Load with `AutoModelForImageTextToText` + `AutoProcessor` (local folder or hub id).

        The source is checked first (`loading.check_model_source`): a missing
        folder, a text-only checkpoint or an unreachable hub id fails at once
        with `ModelNotFoundError` / `UnsupportedModelError`.
        """
        if dtype is not None:
            model_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        # Loading runs torch ops; in a thread of its own, so the caller's thread never joins OpenMP.
        model, processor = run_briefly(lambda: loading.load_pretrained(path_or_id, **model_kwargs))
        if device is not None:
            model = run_briefly(lambda: model.to(device))
        return cls(
            model, processor, config=config, judge=judge, policy=policy, model_name=str(path_or_id), batching=batching
        )

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    @property
    def specials(self) -> tuple[str, ...]:
        """The special-token strings neutralized in user text (what `render_prompt` escapes)."""
        return self._specials

    def _find_vocab_size(self) -> int:
        """Rows of the logits (the output embedding), which may exceed the tokenizer's size."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        return int(head.weight.shape[0]) if head is not None else len(self.tokenizer)

    def _find_token_chars(self) -> int:
        """The most characters one token can stand for (its longest vocabulary entry; byte-level and
        byte-fallback entries are at least as long as the text they decode to)."""
        try:
            vocab = self.tokenizer.get_vocab()
        except Exception:  # a tokenizer without a vocabulary to read: no cheap bound
            return 0
        return max((len(token) for token in vocab), default=0)

    def _find_context_length(self) -> int | None:
        text_config = self.model.config.get_text_config()
        value = getattr(text_config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    # -- public API ---------------------------------------------------------------------

    def judge(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        timeout_s: float | None = None,
        control: RequestControl | None = None,
    ) -> Verdict:
        """The judge's verdict for `messages` (offered `tools`, as in `stream`), without generating an answer.

        `timeout_s` / `control` as in `stream`: past the deadline (or once
        cancelled) the call raises `RequestTimeoutError` (`RequestCancelledError`),
        never a fallback verdict.
        """
        control = self._call_control(timeout_s, control)
        return run_briefly(
            lambda: self._judge(parse_messages(messages, self.policy, max_side=self.image_side).with_request(tools=tools)),
            control=control,
        )

    def generate(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> SafeCoDeResult:
        """Answer `messages` with SafeCoDe. Keyword arguments as in `stream`.

        With `SafeCoDeConfig.check_answer`, the judge then classifies the answer
        (`check_answer`); an unsafe one is replaced by `answer_refusal`
        (`result.answer_check` holds the verdict, `result.answer_replaced` says so).
        """
        result = self.stream(messages, **kwargs).consume()
        if not self.config.check_answer:
            return result
        return run_briefly(lambda: self._checked(messages, result, kwargs))

    async def agenerate(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> SafeCoDeResult:
        """`generate` for asyncio: the event loop never blocks. Keyword arguments as in `stream`."""
        result = await (await self.astream(messages, **kwargs)).aconsume()
        if not self.config.check_answer:
            return result
        return await arun_briefly(lambda: self._checked(messages, result, kwargs))

    def check_answer(
        self,
        messages: Sequence[Mapping[str, Any]],
        answer: str,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        control: RequestControl | None = None,
    ) -> Verdict:
        """The judge's verdict on `answer` to `messages` (offered `tools`): the answer check.

        Needs a judge that classifies answers (a guard judge, `judge="guard:..."`);
        runs through `run_judge`, so `judge_timeout_s` and `on_judge_error` apply
        (a failed check gives an unsafe fallback verdict by default).
        """
        conv = parse_messages(messages, self.policy, max_side=self.image_side).with_request(tools=tools)
        # its own audit line (kind "answer_check"): the request's line was written when its answer ended
        checked = [*messages, {"role": "assistant", "content": answer}]
        with observed_check(self.model_name, checked, self.audit_log, kind="answer_check") as decided:
            verdict = answer_verdict(self.judge_impl, self.judge_request(conv), answer, self.config, control=control)
            decided(verdict)
        return verdict

    def _checked(self, messages: Sequence[Mapping[str, Any]], result: SafeCoDeResult, options: Mapping[str, Any]) -> SafeCoDeResult:
        """`result` after the answer check: replaced by `answer_refusal` when the answer is unsafe."""
        answer = options.get("answer_prefix", "") + result.text  # a forced opening is the answer's own words
        verdict = self.check_answer(messages, answer, tools=options.get("tools"), control=options.get("control"))
        if not verdict.unsafe:
            return result.model_copy(update={"answer_check": verdict})
        return result.model_copy(
            update={"answer_check": verdict, "answer_replaced": True, "text": self.config.answer_refusal}
        )

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: Sequence[str] | str | None = None,
        seed: int | None = None,
        verdict: Verdict | str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
        constraint: Constraint | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: Mapping[int | str, float] | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        min_tokens: int | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        sampling: SamplingParams | None = None,
        start: bool = True,
        timeout_s: float | None = None,
        control: RequestControl | None = None,
    ) -> SafeCoDeStream:
        """Stream the SafeCoDe answer as text pieces; the verdict is decided before the first.

        `verdict` ("safe", "unsafe" or a `Verdict`) overrides the judge. `seed`
        seeds sampling; without one every sampled call draws fresh randomness.
        The image noise always uses `config.seed`, so the same request sees the
        same noised view. `presence_penalty`, `frequency_penalty` (-2..2) and
        `logit_bias` (token id -> -100..100) work as in OpenAI's API, on the
        answer's own tokens; the forced refusal opening of `unsafe_mode="prefix"`
        is exempt (a safety decision is not a sampling preference).
        `min_p`, `repetition_penalty` and `min_tokens` work as in transformers and
        vLLM; `logprobs=True` records each answer token's log probability (with
        the `top_logprobs` likeliest alternatives) in `result.logprobs`. The
        sampling options may come as one `sampling=SamplingParams(...)` instead;
        `safecode_guard.sampling.LIMITS` lists every option's limits.
        `tools` (OpenAI-format function schemas) go to the chat template's
        `tools=`; `answer_prefix` is appended to the prompt as the start of the
        answer (it is not part of the returned text), e.g. to open a tool call.
        `constraint` (a `safecode_guard.constrained.Constraint`: a JSON schema,
        JSON mode, a tool call) makes the answer after `answer_prefix` follow
        its grammar; it is compiled before the judge runs (a schema the grammar
        library cannot compile raises `UnsupportedSchemaError`) and dropped under
        an unsafe verdict, whose answer is a free-text refusal
        (`SafeCoDeResult.constrained` says whether it applied). With
        `SafeCoDeConfig.close_constrained` (the default) an answer that
        `max_new_tokens` would cut ends with its grammar's shortest completion
        instead (`SafeCoDeResult.closed_early`).

        Every check (settings, images, prompt length, context) runs before the
        judge and before any model work. The request is queued for decoding at
        once (it is decoded alongside every other request on the model, whether
        or not its stream is being read); `start=False` returns the stream with
        its verdict but unqueued, to be started with `.start()` or dropped
        (`close()`) without any decoding. Raises `OverloadedError` when the
        model's queue is full.

        `timeout_s` is one deadline for the whole request: preparation, the
        judge (a chat judge's thread, the self judge's prefill in the model's
        queue), queueing, prefill and decoding; `BatchingConfig.request_timeout_s`
        applies too, whichever ends first. Past it the call (or the stream's
        reader) raises `RequestTimeoutError`, also when the time runs out inside
        the judge: a deadline is not a judge failure to fall back from.
        `control` (a `RequestControl`) lets another thread cancel the request:
        its judge is no longer waited for, its queue place and rows are released,
        and reading raises `RequestCancelledError`. Without one, the current
        request's control (`control.current_control()`) is the parent, so a call
        made inside a request shares its deadline and cancellation.
        """
        fields = {
            "max_new_tokens": max_new_tokens, "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "stop": stop, "seed": seed, "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty, "logit_bias": logit_bias, "min_p": min_p,
            "repetition_penalty": repetition_penalty, "min_tokens": min_tokens, "logprobs": logprobs,
            "top_logprobs": top_logprobs,
        }
        options = {
            "verdict": verdict, "tools": tools, "answer_prefix": answer_prefix, "constraint": constraint,
            "sampling": sampling, "fields": fields,
        }
        call = self._call_control(timeout_s, control)
        return run_briefly(lambda: self._open(messages, start, options, call), control=call)

    async def astream(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> SafeCoDeStream:
        """`stream` for asyncio (same arguments): preparation (images, judge) runs off the event loop,
        and the stream is read with `async for`. Cancelling the task that awaits this call (or
        reads the stream) cancels the request."""
        start = kwargs.pop("start", True)
        call = self._call_control(kwargs.pop("timeout_s", None), kwargs.pop("control", None))
        options = {k: kwargs.pop(k) for k in ("verdict", "tools", "answer_prefix", "constraint") if k in kwargs}
        options["sampling"] = kwargs.pop("sampling", None)
        options["fields"] = kwargs  # the sampling options, checked in `_open` (a bad one is a traced failure)
        return await arun_briefly(lambda: self._open(messages, start, options, call), control=call)

    def _call_control(self, timeout_s: float | None, control: RequestControl | None) -> RequestControl:
        """This call's own control: under `control` (or the current request's), ending at the earlier
        of `timeout_s` and `BatchingConfig.request_timeout_s` (both counted from now)."""
        if control is not None and not isinstance(control, RequestControl):
            raise SafeCoDeInputError(
                f"`control` must be a safecode_guard.RequestControl; got a {type(control).__name__}."
            )
        timeout_s = checked_timeout(timeout_s)
        parent = control if control is not None else current_control()
        limit = self.scheduler.settings.request_timeout_s
        if timeout_s is not None and (limit is None or timeout_s <= limit):
            return RequestControl(timeout_s, parent=parent, source=f"timeout_s={timeout_s:g}")
        if limit is not None:
            return RequestControl(limit, parent=parent, source=f"BatchingConfig.request_timeout_s={limit:g}")
        return RequestControl(parent=parent)

    def _open(
        self, messages: Sequence[Mapping[str, Any]], start: bool, options: dict[str, Any], control: RequestControl
    ) -> SafeCoDeStream:
        fields, given = options.pop("fields"), options.pop("sampling")
        named = {k: v for k, v in fields.items() if v is not None}
        described = {**(given.model_dump() if isinstance(given, SamplingParams) else {}), **named}
        # tracing / audit: None (nothing at all to do) unless a tracer records or an audit log is set
        record = RequestRecord.start(self.model_name, messages, described, self.audit_log, self.config.steered_steps)
        with self.scheduler.preparing(), (record.active() if record is not None else contextlib.nullcontext()):
            params = sampling_params(given, fields)  # inside the record: a bad option ends its span as an error
            job, final, judge_s = self._prepare(messages, steered=True, control=control, sampling=params, **options)
            if record is not None:
                # a Verdict object passed in is a decision carried over (e.g. a request asked again
                # under its judge's verdict): recorded as its judge made it, not as an override
                carried = options.get("verdict")
                record.decided(carried if isinstance(carried, Verdict) else final)
            stream = SafeCoDeStream(final, job, self.scheduler, judge_s, self.config.refusal_phrases, record=record)
            control.check()  # cancelled or expired while preparing: never queued
            return stream.start() if start else stream

    def baseline(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        timeout_s: float | None = None,
        control: RequestControl | None = None,
        sampling: SamplingParams | None = None,
        **options: Any,
    ) -> SafeCoDeResult:
        """Plain decoding of the same prompt: no judge, no contrast, no modulation. Sampling options as in `stream`."""
        params = sampling_params(sampling, options)
        call = self._call_control(timeout_s, control)
        job, _, _ = run_briefly(
            lambda: self._prepare(messages, steered=False, sampling=params, control=call), control=call
        )
        return SafeCoDeStream(None, job, self.scheduler, 0.0, self.config.refusal_phrases).consume()

    # -- helpers the self judge uses ---------------------------------------------------------

    def next_token_logits(self, messages: Sequence[Mapping[str, Any]], *, exact: bool = False) -> torch.Tensor:
        """Logits `(V,)` (float32, CPU) for the first token of the assistant's answer: one prefill.

        Runs through the scheduler between decode steps; concurrent calls are prefilled together
        as one left-padded batch (the logits may then differ from a solo prefill in their last
        float digits). `exact=True` prefills this prompt alone.
        """
        conv = parse_messages(messages, self.policy, max_side=self.image_side)
        self._check_images(conv)
        prompt = render_prompt(self.processor, conv.messages, self._specials)
        return self.scheduler.prefill_logits(self.processor, prompt, list(conv.images), alone=exact)

    def plain_text(self, messages: Sequence[Mapping[str, Any]], max_new_tokens: int = 64) -> str:
        """Greedy plain decoding of `messages` (used for captions): no judge, no SafeCoDe."""
        return self.baseline(messages, max_new_tokens=max_new_tokens).text

    # -- internals --------------------------------------------------------------------------

    def _prepare(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        steered: bool,
        sampling: SamplingParams,
        verdict: Verdict | str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        answer_prefix: str = "",
        constraint: Constraint | None = None,
        control: RequestControl | None = None,
    ) -> tuple[DecodeJob, Verdict | None, float]:
        """Everything before decoding, in a preparation thread: checks, images, prompt, judge.

        Stops (raises) between steps once `control` is cancelled or past its deadline."""
        params = sampling
        max_new_tokens = params.max_new_tokens
        decoding = self._sampling(params)
        override = self._override(verdict) if verdict is not None else None
        if constraint is not None:
            if not isinstance(constraint, Constraint):
                raise SafeCoDeInputError(
                    f"`constraint` must be a safecode_guard.constrained.Constraint (e.g. "
                    f"json_schema_constraint(schema)); got a {type(constraint).__name__}."
                )
            if params.min_tokens and constraint.kind != "tool_call":
                raise ended_by_grammar(params.min_tokens)
            compiled = self.grammars.compile(constraint)  # an uncompilable schema fails before any model work
        # One conversation object: the prompt below and the judge's request both come from it.
        conv = parse_messages(messages, self.policy, max_side=self.image_side).with_request(
            tools=tools, answer_prefix=answer_prefix
        )
        self._check_images(conv)
        checkpoint()
        cfg = self.config
        window = cfg.steered_steps if steered else 0
        contrastive = window > 0 and bool(conv.images)
        views: list[list[Any]] = [list(conv.images)] if conv.images else []
        if contrastive:
            noise = torch.Generator().manual_seed(cfg.seed)
            views.append([ops.noised_image(img, cfg.noise_std, noise) for img in conv.images])
        prompt = render_prompt(self.processor, conv, self._specials)
        self._check_prompt_chars(len(prompt), max_new_tokens)
        rows = encode_rows(self.processor, prompt, views)
        prompt_len = rows[0].length
        self._check_length(prompt_len, max_new_tokens)
        checkpoint()
        # Only now, with every limit checked, may the judge (maybe a forward pass) run.
        t0 = time.perf_counter()
        final = override if override is not None else (self._judge(conv) if steered else None)
        judge_s = time.perf_counter() - t0
        checkpoint()
        generator = None
        if decoding.do_sample:
            device = self.model.device
            seed = params.seed
            generator = torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else seed)
        label = final.label if final is not None else "safe"
        # an unsafe verdict answers with a free-text refusal, never with schema-shaped text
        row_constraint = None
        if constraint is not None and label != "unsafe":
            row_constraint = self.grammars.row(compiled, max_new_tokens if cfg.close_constrained else None)
        steering = Steering(
            cfg, self._refusal_seqs, label, window, contrastive, decoding, generator,
            min_tokens=params.min_tokens, eos_ids=self._eos_ids,
            logprobs=(params.top_logprobs or 0) if params.logprobs else None, constraint=row_constraint,
        )
        job = DecodeJob(
            prompt_rows=rows,
            steering=steering,
            tracker=TextTracker(self.tokenizer, [s for s in params.stop if s], strip_leading=not answer_prefix),
            eos_ids=self._eos_ids,
            max_new_tokens=max_new_tokens,
            prompt_len=prompt_len,
            n_images=len(conv.images),
            steered=steered,
            # the deadline counts from the call (judging included): `control` carries it
            control=control if control is not None else self._call_control(None, None),
        )
        return job, final, judge_s

    def _check_images(self, conv: Conversation) -> None:
        if self.quirks.requires_image and not conv.images:
            raise UnsupportedContentError(
                f"{type(self.model).__name__} needs an image in every request; this one has none. "
                "Add an image, or use a model with a text-only path for plain chat turns."
            )

    def _sampling(self, params: SamplingParams) -> ops.Sampling:
        """What decoding reads of `params`, after the limits that depend on this model and policy."""
        limit = self.policy.max_new_tokens_limit
        if params.max_new_tokens > limit:
            error = InputLimitError(
                f"`max_new_tokens` (={params.max_new_tokens!r}) must be an integer from 1 to {limit}. "
                "Ask for fewer tokens or raise `InputPolicy.max_new_tokens_limit`."
            )
            error.param = "max_new_tokens"
            raise error
        return ops.Sampling(
            params.sampled,
            params.temperature,
            params.top_k,
            params.top_p,
            presence_penalty=params.presence_penalty or 0.0,
            frequency_penalty=params.frequency_penalty or 0.0,
            logit_bias=self._check_logit_bias(params.logit_bias),
            min_p=params.min_p,
            repetition_penalty=params.repetition_penalty,
        )

    def _check_logit_bias(self, logit_bias: Mapping[int | str, float] | None) -> dict[int, float]:
        """`logit_bias` with integer keys, each a token id of this model and each bias in -100..100."""
        biases = SamplingParams.build(logit_bias=logit_bias).logit_bias or {}
        vocab = self._vocab_size
        for token in biases:
            if not 0 <= token < vocab:
                error = SafeCoDeInputError(
                    f"`logit_bias` key {token!r} is not a token id of this model (0 to {vocab - 1}). "
                    "Use the tokenizer's ids, e.g. tokenizer.encode(' yes', add_special_tokens=False)."
                )
                error.param = "logit_bias"
                raise error
        return biases

    def _override(self, verdict: Verdict | Mapping[str, Any] | str) -> Verdict:
        if isinstance(verdict, str) and verdict in ("safe", "unsafe"):
            return Verdict(label=verdict, judge="override", source="override")
        if isinstance(verdict, (Verdict, Mapping)):
            # rebuilt and validated: a forged Verdict (model_construct, label "UNSAFE", NaN score) is refused
            return validated_verdict(verdict).model_copy(update={"source": "override"})
        raise SafeCoDeInputError(
            f'`verdict` (={verdict!r}) must be "safe", "unsafe" or a Verdict; leave it None to ask the judge.'
        )

    def judge_request(self, conv: Conversation) -> JudgeRequest:
        """The judge's request for `conv`: what this model reads, text parts joined as its chat template joins them."""
        joins = template_joins(self.processor, conv, self._specials)
        return JudgeRequest.from_conversation(conv.with_joins(joins), threshold=self.config.threshold)

    def _judge(self, conv: Conversation) -> Verdict:
        with judge_span(judge_name(self.judge_impl)) as span:  # None unless this request is traced
            verdict = self._run_judge(conv)
            if span is not None:
                span.set_attributes(verdict_attributes(verdict))
            return verdict

    def _run_judge(self, conv: Conversation) -> Verdict:
        request = self.judge_request(conv)
        judge = self.judge_impl
        handed = handed_off_verdict(request, judge_name(judge))
        if handed is not None:
            return handed  # the same judge already decided this very request upstream (e.g. a rail)
        if isinstance(judge, SelfJudge) and judge.engine is self:
            # The self judge is our own model's forward pass, queued with every other request:
            # time spent waiting for the model must never count as a judge timeout.
            return run_judge(judge, request, self._untimed_config)
        return run_judge(judge, request, self.config)

    def _check_prompt_chars(self, chars: int, max_new_tokens: int) -> None:
        """Refuse, before tokenizing, a prompt too long to fit whatever its tokens (`InputLimitError`).

        Every token stands for at most `_token_chars` characters, so a prompt of
        more than `limit * _token_chars` characters holds more than `limit`
        tokens (4x slack for normalizers that merge characters). Tokenizing a
        63 MB message only to count its tokens took minutes and 12 GB.
        """
        limits = [self.policy.max_prompt_tokens] if self.policy.max_prompt_tokens is not None else []
        if self.context_length is not None:
            limits.append(self.context_length - max_new_tokens)
        if not limits or self._token_chars <= 0:
            return
        limit = max(min(limits), 0)
        if chars > 4 * self._token_chars * max(limit, 1):
            raise InputLimitError(
                f"The prompt is {chars} characters long: more than the {limit} tokens it may take "
                f"(`InputPolicy.max_prompt_tokens`, or the model's context of {self.context_length} tokens minus "
                "max_new_tokens) could hold. Shorten the conversation or send less text."
            )

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.policy.max_prompt_tokens
        if limit is not None and prompt_len > limit:
            raise InputLimitError(
                f"The prompt is {prompt_len} tokens; the limit is {limit}. "
                "Shorten the conversation, send fewer or smaller images, or raise `InputPolicy.max_prompt_tokens`."
            )
        if self.context_length is not None and prompt_len + max_new_tokens > self.context_length:
            raise InputLimitError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {self.context_length} tokens. Shorten the conversation or ask for fewer new tokens."
            )
