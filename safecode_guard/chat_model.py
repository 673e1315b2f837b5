"""`ChatSafeCoDe`: SafeCoDe decoding as a LangChain chat model.

    from safecode_guard import ChatSafeCoDe
    llm = ChatSafeCoDe(model="path/or/hub-id", judge="self")
    answer = llm.invoke([HumanMessage([{"type": "image", "base64": b64, "mime_type": "image/png"},
                                       {"type": "text", "text": "How do I run faster here?"}])])
    answer.response_metadata["safety"]["verdict"]   # "safe" | "unsafe"

Input flow: LangChain messages -> `lc_messages.to_hf_messages` (every image
shape LangChain produces, decoded to PIL under `policy`; unsupported blocks
rejected) -> the `SafeCoDe` engine, loaded on first use (never in
`__init__`; once, under a lock) -> `SafeCoDe.stream`.

Output flow:

- invoke / batch / ainvoke / abatch: one `AIMessage` holding the answer only
  (no prompt echo, stop string excluded). `response_metadata` holds `safety`
  (SPEC section 5, built by `safety_metadata`), `model_name`,
  `finish_reason` and `model_provider="safecode"`; `usage_metadata` the real
  token counts of the prompt and the answer.
- stream / astream / astream_events / stream_events: text chunks as the
  engine decodes them. The FIRST chunk carries `safety` (and
  `model_provider`); the LAST chunk (`chunk_position="last"`) carries
  `model_name`, `finish_reason` and `usage_metadata`. Each rides on exactly
  one chunk, so merged chunks hold the same metadata as `invoke`
  (LangChain's merge concatenates repeated strings and sums numbers).
  `safety["refused"]` describes how the answer opens, so the first chunk
  goes out as soon as the opening settles it (`refusal_decision`): usually
  within the first few tokens, always before any text is shown.

Async never blocks the event loop: `ainvoke` runs the engine in a worker
thread (LangChain's default `_agenerate`), and `astream` runs the sync
stream in one dedicated thread that hands chunks over through an
`asyncio.Queue` (one thread, because the engine's lock must be released by
the thread that took it). One instance is safe to share between threads:
the engine serialises calls and loading happens once.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from . import ops
from .config import InputPolicy, SafeCoDeConfig
from .errors import SafeCoDeInputError, UnsupportedContentError
from .lc_messages import to_hf_messages
from .verdict import Verdict

if TYPE_CHECKING:
    from .engine import SafeCoDe, SafeCoDeResult, SafeCoDeStream

__all__ = ["ChatSafeCoDe", "refusal_decision", "safety_metadata"]

PROVIDER = "safecode"

#: Keyword arguments one call may add (`llm.invoke(msgs, temperature=0.7)`, `llm.bind(...)`).
CALL_OPTIONS = (
    "model",
    "max_new_tokens",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "seed",
    "verdict",
)

_DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")


# --------------------------------------------------------------------------- pure helpers


def safety_metadata(verdict: Verdict, config: SafeCoDeConfig, refused: bool) -> dict[str, Any]:
    """`response_metadata["safety"]` (SPEC section 5) for one answer."""
    return {
        "verdict": verdict.label,
        "unsafe_score": verdict.unsafe_score,
        "threshold": config.threshold,
        "judge": verdict.judge,
        "source": verdict.source,
        "caption": verdict.caption,
        "error": verdict.error,
        "steered_steps": config.steered_steps,
        "unsafe_mode": config.unsafe_mode,
        "refused": refused,
    }


def refusal_decision(text: str, phrases: Sequence[str]) -> bool | None:
    """Whether an answer that begins with `text` opens with a refusal phrase; None while undecided.

    Agrees with `ops.opens_with_refusal` on every continuation of `text`:
    True once a phrase is complete, False once no phrase can still match,
    None while `text` (ignoring leading space, case and curly apostrophes)
    is still the start of some phrase.
    """
    head = text.lstrip()
    if not head:
        return None
    if ops.opens_with_refusal(head, phrases):
        return True
    # `opens_with_refusal(p, [head])` asks whether phrase p starts with `head`, normalised alike.
    if any(ops.opens_with_refusal(p, [head]) for p in phrases):
        return None
    return False


def usage_metadata(result: SafeCoDeResult) -> UsageMetadata:
    """LangChain usage counts from the engine's: prompt tokens of the real view, answer tokens."""
    return UsageMetadata(
        input_tokens=result.usage.prompt_tokens,
        output_tokens=result.usage.completion_tokens,
        total_tokens=result.usage.total_tokens,
    )


def sampling_kwargs(
    temperature: float | None, top_p: float | None, top_k: int | None, do_sample: bool | None
) -> dict[str, Any]:
    """LangChain's sampling conventions in the engine's terms.

    `temperature=0` means deterministic (greedy) decoding, as everywhere in
    LangChain; `do_sample=None` samples exactly when a temperature above 0 is set.
    """
    if temperature == 0:
        if do_sample:
            raise SafeCoDeInputError(
                "`temperature` (=0) asks for greedy decoding but `do_sample=True` asks for sampling. "
                "Set a temperature above 0 to sample, or do_sample=False (or None) for greedy decoding."
            )
        temperature, do_sample = None, False
    if do_sample is None:
        do_sample = temperature is not None
    return {"do_sample": do_sample, "temperature": temperature, "top_p": top_p, "top_k": top_k}


def _judge_key(judge: Any) -> str:
    """A stable description of a judge for identifying params: the spec, or the object's name and type."""
    if isinstance(judge, str):
        return judge
    name = getattr(judge, "name", None) or getattr(judge, "__name__", None) or ""
    return f"{type(judge).__module__}.{type(judge).__qualname__}:{name}"


# --------------------------------------------------------------------------- engine cache


class _Engines:
    """The engines one `ChatSafeCoDe` has loaded, and the lock that makes each load happen once.

    Two slots: the configured model, and the most recent per-call `model=`
    override (one, so that overrides cannot pile up weights). A slot is
    rebuilt when the settings that built it change. Copies of the chat model
    (`model_copy`, `deepcopy`) share this object, so weights are never duplicated.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slots: dict[str, tuple[tuple[Any, ...], SafeCoDe]] = {}

    def get(self, slot: str, key: tuple[Any, ...], build: Callable[[], SafeCoDe]) -> SafeCoDe:
        with self.lock:
            held = self.slots.get(slot)
            if held is None or held[0] != key:
                self.slots[slot] = (key, build())
            return self.slots[slot][1]

    def __deepcopy__(self, memo: dict[int, Any]) -> _Engines:
        return self


# --------------------------------------------------------------------------- the chat model


class ChatSafeCoDe(BaseChatModel):
    """A local Hugging Face vision-language model behind SafeCoDe, as a LangChain chat model.

    Every answer carries the scene-level safety verdict that steered it in
    `response_metadata["safety"]`, so chains, agents and rails can branch on it.

    Construct from a path or hub id (loaded lazily on first use):

        llm = ChatSafeCoDe(model="./llava-1.5-7b-hf", judge="self", max_new_tokens=256)

    or wrap objects already loaded: `ChatSafeCoDe.from_model(model, processor)`.

    Per call you may pass `model` (another path: loaded once and kept until
    the next different override), `max_new_tokens` (or `max_tokens`),
    `temperature`, `top_p`, `top_k`, `do_sample`, `seed`, `stop`, and
    `verdict` ("safe" / "unsafe": skip the judge, `source="override"`).
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, arbitrary_types_allowed=True)

    model: str
    """Local folder (saved with `save_pretrained`) or hub id of an image-text-to-text model.
    Loaded with `AutoModelForImageTextToText` + `AutoProcessor` on first use, never in `__init__`."""
    judge: Any = "self"
    """Who decides safe / unsafe: a spec string ("self", "self:caption", "fixed:safe",
    "fixed:unsafe", "chat:<provider>:<model>"), a judge object, a LangChain chat model, or a
    callable taking a `JudgeRequest`."""
    safecode: SafeCoDeConfig = Field(default_factory=SafeCoDeConfig)
    """The method's settings (contrast, refusal modulation, threshold, judge failure policy)."""
    policy: InputPolicy = Field(default_factory=InputPolicy)
    """What requests may contain: image count and size, URL / local-file images (off by default)."""
    max_new_tokens: int = Field(default=256, ge=1, alias="max_tokens")
    """Most tokens in one answer (also accepted as `max_tokens`)."""
    temperature: float | None = Field(default=None, ge=0.0)
    """Sampling temperature; 0 or None decodes greedily unless `do_sample` says otherwise."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling mass (when sampling)."""
    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k likeliest tokens only (when sampling); 0 turns it off."""
    do_sample: bool | None = None
    """Sample (True) or decode greedily (False); None samples exactly when `temperature` > 0."""
    seed: int | None = Field(default=None, ge=0)
    """Seeds sampling; None uses `safecode.seed`. The image noise always uses `safecode.seed`."""
    stop: list[str] | None = None
    """Stop strings: the answer ends before the first one. A call's own `stop` replaces these."""
    streaming: bool = False
    """Decode through `_stream` on `invoke` too (callbacks then see chunks with metadata)."""
    device: str | None = None
    """Where to put the model when loading it ("cpu", "cuda", "cuda:1", "mps"); None leaves it
    where `from_pretrained` puts it (CPU unless `model_kwargs` says `device_map`)."""
    dtype: str | None = None
    """Weights dtype when loading: "auto", "float32", "float16", "bfloat16"; None: the default."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for `AutoModelForImageTextToText.from_pretrained`
    (e.g. `{"attn_implementation": "sdpa"}` or `{"device_map": "auto"}`)."""

    _engines: _Engines = PrivateAttr(default_factory=_Engines)
    _hf_objects: tuple[Any, Any] | None = PrivateAttr(default=None)

    # -- validation -------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _one_max_tokens(cls, values: Any) -> Any:
        both = isinstance(values, Mapping) and "max_tokens" in values and "max_new_tokens" in values
        if both and values["max_tokens"] != values["max_new_tokens"]:
            raise ValueError(
                f"`max_tokens` (={values['max_tokens']!r}) and `max_new_tokens` (={values['max_new_tokens']!r}) "
                "are the same setting; give one of them."
            )
        return values

    @field_validator("judge")
    @classmethod
    def _check_judge(cls, value: Any) -> Any:
        from .judges import make_judge

        make_judge(value)  # fail at construction on a bad spec; the engine makes its own later
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            value = str(value).removeprefix("torch.")  # a torch.dtype
        if value is not None and value not in _DTYPES:
            raise ValueError(f"`dtype` (={value!r}) must be one of {list(_DTYPES)} or None.")
        return value

    # -- construction from loaded objects ---------------------------------------------------

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, model_name: str | None = None, **kwargs: Any) -> ChatSafeCoDe:
        """Wrap a loaded `model` and `processor` (no loading, no copy). `kwargs` are the other fields."""
        name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        chat = cls(model=str(name), **kwargs)
        chat._hf_objects = (model, processor)
        chat._engine(None)  # cheap without loading; checks the processor and judge now
        return chat

    # -- LangChain identity -----------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return PROVIDER

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Every setting that changes an answer: LangChain's cache keys on these."""
        return {
            "model": self.model,
            "judge": _judge_key(self.judge),
            "safecode": self.safecode.model_dump(mode="json"),
            "policy": self.policy.model_dump(mode="json"),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "do_sample": self.do_sample,
            "seed": self.seed,
            # not "stop": LangChain overwrites that key with the call's own stop
            "default_stop": self.stop,
            "device": self.device,
            "dtype": self.dtype,
            "model_kwargs": self.model_kwargs,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=str(kwargs.get("model") or self.model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_new_tokens", kwargs.get("max_tokens", self.max_new_tokens)),
        )
        if (ls_stop := stop if stop is not None else self.stop):
            params["ls_stop"] = list(ls_stop)
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            open_weights=True,
            text_inputs=True,
            image_inputs=True,
            image_url_inputs=self.policy.allow_image_urls,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            tool_calling=False,
            structured_output=False,
        )

    # -- the engine -------------------------------------------------------------------------

    def _engine_key(self, model: str) -> tuple[Any, ...]:
        judge = self.judge if isinstance(self.judge, str) else id(self.judge)
        kwargs = sorted(self.model_kwargs.items(), key=lambda kv: kv[0])
        return (model, judge, self.safecode, self.policy, self.device, self.dtype, repr(kwargs))

    def _engine(self, model: str | None) -> SafeCoDe:
        """The engine for `model` (None: the configured one), loading it on first use."""
        from .engine import SafeCoDe

        model = model or self.model
        settings = {"config": self.safecode, "judge": self.judge, "policy": self.policy}
        if model == self.model and self._hf_objects is not None:
            hf_model, processor = self._hf_objects

            def build() -> SafeCoDe:
                return SafeCoDe(hf_model, processor, model_name=self.model, **settings)

        else:

            def build() -> SafeCoDe:
                return SafeCoDe.from_pretrained(
                    model, device=self.device, dtype=self.dtype, **settings, **self.model_kwargs
                )

        slot = "main" if model == self.model else "override"
        return self._engines.get(slot, self._engine_key(model), build)

    # -- one call ---------------------------------------------------------------------------

    def _call_settings(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """(model override, keyword arguments for `SafeCoDe.stream`) for one call."""
        options = {k: v for k, v in kwargs.items() if k != "stream"}  # LangChain's own routing flag
        unknown = sorted(set(options) - set(CALL_OPTIONS))
        if {"tools", "tool_choice", "functions"} & set(unknown):
            raise UnsupportedContentError(
                "ChatSafeCoDe has no tool calling yet; call it without tools (no bind_tools, no tools=...)."
            )
        if unknown:
            raise SafeCoDeInputError(
                f"Unknown option(s) {unknown} for ChatSafeCoDe. Per call it accepts {list(CALL_OPTIONS)} and stop."
            )
        if "max_tokens" in options and "max_new_tokens" in options:
            raise SafeCoDeInputError("Give `max_new_tokens` or its alias `max_tokens`, not both.")
        max_new_tokens = options.get("max_new_tokens", options.get("max_tokens", self.max_new_tokens))
        engine_kwargs = {
            "max_new_tokens": max_new_tokens,
            "stop": list(stop) if stop is not None else self.stop,
            "seed": options.get("seed", self.seed),
            "verdict": options.get("verdict"),
            **sampling_kwargs(
                options.get("temperature", self.temperature),
                options.get("top_p", self.top_p),
                options.get("top_k", self.top_k),
                options.get("do_sample", self.do_sample),
            ),
        }
        return options.get("model"), engine_kwargs

    def _start(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]
    ) -> tuple[SafeCoDe, SafeCoDeStream]:
        """Check the call, convert the messages (before any loading), load, judge, start decoding."""
        model, engine_kwargs = self._call_settings(stop, kwargs)
        hf_messages = to_hf_messages(messages, self.policy)
        engine = self._engine(model)
        return engine, engine.stream(hf_messages, **engine_kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, pieces = self._start(messages, stop, kwargs)
        try:
            for piece in pieces:
                if run_manager:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    run_manager.on_llm_new_token(piece, chunk=chunk)
        finally:
            pieces.close()
        result = pieces.result
        assert result is not None and result.verdict is not None  # set once iteration ends
        message = AIMessage(
            content=result.text,
            response_metadata={
                "safety": safety_metadata(result.verdict, engine.config, result.refused),
                "model_provider": PROVIDER,
                "model_name": engine.model_name,
                "finish_reason": result.finish_reason,
            },
            usage_metadata=usage_metadata(result),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        engine, pieces = self._start(messages, stop, kwargs)
        try:
            for chunk in _chunks(engine, pieces):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # an abandoned stream releases the engine here, in the thread that holds it

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        chunks = _iterate_in_thread(lambda: self._stream(messages, stop=stop, **kwargs))
        async for chunk in chunks:
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _chunks(engine: SafeCoDe, pieces: SafeCoDeStream) -> Iterator[ChatGenerationChunk]:
    """Engine text pieces as LangChain chunks: `safety` on the first, the accounting on the last.

    Text is held back only until `refusal_decision` can fill `safety["refused"]`.
    """
    verdict = pieces.verdict
    assert verdict is not None  # SafeCoDe.stream decides the verdict before returning
    held, refused = "", None
    for piece in pieces:
        if refused is not None:
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
            continue
        held += piece
        refused = refusal_decision(held, engine.config.refusal_phrases)
        if refused is not None:
            yield _first_chunk(held, verdict, engine.config, refused)
    result = pieces.result
    assert result is not None
    if refused is None:  # the answer ended before its opening decided (e.g. an empty answer)
        yield _first_chunk(held, verdict, engine.config, result.refused)
    yield ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            chunk_position="last",
            response_metadata={"model_name": engine.model_name, "finish_reason": result.finish_reason},
            usage_metadata=usage_metadata(result),
        )
    )


def _first_chunk(text: str, verdict: Verdict, config: SafeCoDeConfig, refused: bool) -> ChatGenerationChunk:
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=text,
            response_metadata={"safety": safety_metadata(verdict, config, refused), "model_provider": PROVIDER},
        )
    )


_DONE = object()


async def _iterate_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in one worker thread; yield its items on the event loop as they come.

    One thread from start to end, because the engine's lock must be released
    by the thread that took it (LangChain's default `_astream` calls `next`
    from whichever executor thread is free). When the consumer stops early,
    the worker stops at its next item and closes the iterator itself.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def send(item: Any, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop closed under us: nobody is listening any more
            stop.set()

    def work() -> None:
        iterator = None
        try:
            iterator = make_iterator()
            for item in iterator:
                if stop.is_set():
                    break
                send(item)
        except BaseException as exc:  # handed to the consumer, raised there
            send(_DONE, exc)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        send(_DONE)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(work,), name="safecode-astream", daemon=True)
    worker.start()
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
