"""`ChatSafeCoDe`: SafeCoDe decoding as a LangChain chat model.

    from safecode_guard import ChatSafeCoDe
    llm = ChatSafeCoDe(model="path/or/hub-id", judge="self")
    answer = llm.invoke([HumanMessage([{"type": "image", "base64": b64, "mime_type": "image/png"},
                                       {"type": "text", "text": "How do I run faster here?"}])])
    answer.response_metadata["safety"]["verdict"]   # "safe" | "unsafe"

Input: LangChain messages -> `langchain.messages.to_hf_messages` (every image
shape LangChain produces, decoded under `policy`) -> the `SafeCoDe` engine,
loaded on first use, once (`langchain.engines`) -> `SafeCoDe.stream`.
Output: the engine's text pieces -> `langchain.chunks` (an `AnswerReader`
splits text and tool calls) -> `ChatGenerationChunk`s. `stream` yields them
and `invoke` merges the same chunks, so both agree by construction.

- invoke / batch: one `AIMessage` with `response_metadata["safety"]` (SPEC
  section 5), `model_name`, `finish_reason`, `model_provider="safecode"`, and
  real token counts in `usage_metadata`.
- stream: `safety` rides on the FIRST chunk (sent once the opening settles
  `safety["refused"]`), the accounting on the LAST (`chunk_position="last"`).
  With `SafeCoDeConfig.check_answer`, `invoke` replaces an unsafe answer by
  `answer_refusal`; a stream's last chunk only flags it (`answer_check`).
- Tools (`bind_tools`, SPEC section 4; `langchain.tools`, `langchain.tool_calls`):
  schemas go through the chat template's `tools=`; unreadable calls land in
  `invalid_tool_calls`; under an unsafe verdict the answer carries no tool
  calls (they are listed in `safety["blocked_tool_calls"]`).
  `with_structured_output` works through a forced tool call or JSON mode.

Async: `ainvoke`/`astream` prepare the call (images, loading, judge) in a
short-lived worker thread (`control.arun_briefly`), then await decoding on
the model's scheduler: no thread is held per call, so concurrent calls are
decoded together in batches. One instance is safe to share between threads.
"""


from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import ModelRefusalError
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from .. import constrained
from ..calls import open_call, response_format_schema, tool_template
from ..config import InputPolicy, SafeCoDeConfig
from ..control import arun_briefly
from ..engine.adapters import encode_views
from ..engine.core import SafeCoDe
from ..engine.loading import load_processor, loaded_model, public_name, shared_model, weights_key
from ..errors import SafeCoDeInputError, UnsupportedContentError, UnsupportedModelError
from ..judges import ChatSafeCoDeJudge, make_judge
from ..observability.audit import AuditLog, shared_audit_log
from ..prompting import render_prompt, special_strings
from ..sampling import SamplingParams
from ..verdict import Verdict
from . import tools as tools_mod
from .cache import cache_view, judge_description
from .calls import Call, Retry, check_conversation, merge_turns, refused_already
from .chunks import aanswer_chunks, answer_chunks, replace_unsafe_answer
from .engines import Engines
from .messages import to_hf_messages
from .settings import (
    CALL_OPTIONS,
    DTYPES,
    PROVIDER,
    check_nested_settings,
    check_settings,
    sampling_kwargs,
)
from .tool_calls import structured_output, tool_calling_from_files

# --------------------------------------------------------------------------- the chat model


# decoding options that are call options only (no ChatSafeCoDe field holds a default for them)
_CALL_ONLY_SAMPLING = ("min_p", "repetition_penalty", "min_tokens", "logprobs", "top_logprobs")


class ChatSafeCoDe(BaseChatModel):
    """A local Hugging Face vision-language model behind SafeCoDe, as a LangChain chat model.

    Every answer carries the scene-level safety verdict that steered it in
    `response_metadata["safety"]`, so chains, agents and rails can branch on it.

    Construct from a path or hub id (loaded lazily on first use):

        llm = ChatSafeCoDe(model="./llava-1.5-7b-hf", judge="self", max_new_tokens=256)

    or wrap objects already loaded: `ChatSafeCoDe.from_model(model, processor)`.
    Unknown constructor keys are refused (`SafeCoDeInputError` naming the key
    and the closest setting, e.g. `threshold` -> `safecode=SafeCoDeConfig(threshold=...)`);
    so is `base_url`, which means nothing for a model running in this process.
    LangChain's standard `timeout` (the request's deadline), `max_retries`
    (a full queue, a busy judge) and `api_key` (unused) are accepted.

    Per call you may pass `model` (another path: loaded once and kept until
    the next different override), `max_new_tokens` (or `max_tokens`,
    `max_completion_tokens`), `temperature`, `top_p`, `top_k`, `do_sample`,
    `seed`, `stop`, `presence_penalty`, `frequency_penalty`, `logit_bias`, and
    `verdict` ("safe" / "unsafe" / a `Verdict`: skip the judge, `source="override"`).

    Tools: `llm.bind_tools([...], tool_choice=...)` for models whose chat
    template takes tools; `llm.with_structured_output(schema)`. Under an
    unsafe verdict answers carry no tool calls (`safety["blocked_tool_calls"]`)
    and a forced `tool_choice` or JSON mode gives way to a plain-text refusal.

    LangChain's LLM cache (`set_llm_cache`, `cache=`) is honoured when the key
    describes the answer: it is skipped for requests whose images are references
    (URLs, file paths, in-memory PIL images) and for judges without a stable
    description (see `judge_fingerprint`; give a custom judge a `cache_key`),
    and answers made under a fallback verdict (a failed judge) are never stored.

    Token counting (`get_num_tokens`, `get_num_tokens_from_messages`,
    `trim_messages(token_counter=llm)`) uses the model's own tokenizer and chat
    template, images counted as the processor expands them; before the model
    is loaded only its processor is (no weights). Pickling drops what is
    loaded (engines, and the objects `from_model` wrapped): the unpickled
    model loads `model` (a path or hub id) again on first use.
    """

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, arbitrary_types_allowed=True)

    model: str
    """Local folder (saved with `save_pretrained`), hub id of an image-text-to-text model, or
    "demo" (the embedded demo model, built on first use). Loaded with `AutoModelForImageTextToText`
    + `AutoProcessor` on first use, never in `__init__`; every chat model of the process that
    names the same weights with the same `device` / `dtype` / `model_kwargs` shares one load."""
    model_name: str | None = None
    """The name answers report (`response_metadata["model_name"]`, LangSmith's `ls_model_name`,
    the key of LangChain's usage callback). None: the folder's own name for a local folder
    (never its path), the hub id, or "demo"."""
    judge: Any = "self"
    """Who decides safe / unsafe: a spec string ("self", "self:caption", "fixed:safe",
    "fixed:unsafe", "chat:<provider>:<model>", "guard:<folder or hub id>" for Llama Guard 3
    Vision / 4 or ShieldGemma 2), a judge object, a LangChain chat model, or a
    callable taking a `JudgeRequest`. Answers decided by a callable or a custom judge object
    are not cached by LangChain's LLM cache unless the object has a string `cache_key`."""
    safecode: SafeCoDeConfig = Field(default_factory=SafeCoDeConfig)
    """The method's settings (contrast, refusal modulation, threshold, judge failure policy)."""
    policy: InputPolicy = Field(default_factory=InputPolicy)
    """What requests may contain: image count and size, URL / local-file images (off by default)."""
    max_new_tokens: int = Field(default=256, alias="max_tokens")
    """Most tokens in one answer (also accepted, and readable, as `max_tokens`)."""
    temperature: float | None = None
    """Sampling temperature; 0 or None decodes greedily unless `do_sample` says otherwise."""
    top_p: float | None = None
    """Nucleus sampling mass (when sampling)."""
    top_k: int | None = None
    """Sample from the k likeliest tokens only (when sampling); 0 turns it off."""
    do_sample: bool | None = None
    """Sample (True) or decode greedily (False); None samples exactly when `temperature` > 0."""
    seed: int | None = None
    """Seeds sampling, so a sampled answer can be reproduced; None (the default) draws fresh
    randomness for every call. Greedy decoding ignores it. The image noise of the contrast
    always uses `safecode.seed`, so one request always sees the same noised view."""
    presence_penalty: float | None = None
    """OpenAI's presence penalty on the answer's own tokens (-2..2); None or 0 turns it off."""
    frequency_penalty: float | None = None
    """OpenAI's frequency penalty on the answer's own tokens (-2..2); None or 0 turns it off."""
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
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """The request's deadline in seconds, for everything a call waits on once the model is
    loaded: preparing images and the prompt, the judge, the queue, the prefill and decoding
    (retries and their pauses included). Past it the call, or the stream being read, raises
    `RequestTimeoutError` (a `TimeoutError`) and the request leaves the model at once.
    Loading the weights on first use is not counted. None: no deadline beyond the judge's
    own `safecode.judge_timeout_s` and the scheduler's `request_timeout_s`."""
    max_retries: int = Field(default=0, ge=0, le=10)
    """How often a call is tried again, with exponential backoff, when it fails for a moment:
    the model's queue is full (`OverloadedError`) or every judge thread is busy
    (`JudgeBusyError`, whether raised or turned into a fallback verdict). Nothing else is
    retried (bad input, a failed or slow judge, the deadline). 0 (the default): fail at once."""
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """Accepted for LangChain's standard constructor (shared configs pass one) and unused: a
    model running in this process needs no key. Never logged, traced, cached or pickled."""

    audit_log: AuditLog | str | None = Field(default=None, exclude=True)
    """Audit log of this model's decisions: an `AuditLog`, or a path ("-": stdout) opened once per process."""

    _engines: Engines = PrivateAttr(default_factory=Engines)

    # -- validation -------------------------------------------------------------------------

    def __init__(self, **data: Any) -> None:
        # Before pydantic: its errors would wrap ours, and it would drop unknown keys silently.
        check_settings(type(self), list(data))
        check_nested_settings(data)
        if "model" not in data and "model_name" in data:
            raise SafeCoDeInputError(
                f"`model_name` (={data['model_name']!r}) is only the name answers report; give the model to load "
                "as `model` (a local folder, a hub id or 'demo'), e.g. ChatSafeCoDe(model='./llava', model_name='llava')."
            )
        super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """As pydantic's, with unknown keys refused as the constructor refuses them."""
        if isinstance(obj, Mapping):  # this path does not pass through __init__
            check_settings(cls, list(obj))
            check_nested_settings(obj)
        return super().model_validate(obj, **kwargs)

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

    @model_validator(mode="after")
    def _sampling_settings(self) -> Self:
        # the decoding defaults obey the limits of `SamplingParams`, with its messages (as every call does)
        SamplingParams.build(
            max_new_tokens=self.max_new_tokens, stop=self.stop, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            **sampling_kwargs(self.temperature, self.top_p, self.top_k, self.do_sample),
        )
        return self

    @field_validator("judge")
    @classmethod
    def _check_judge(cls, value: Any) -> Any:
        make_judge(value)  # fail at construction on a bad spec; the engine makes its own later
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            value = str(value).removeprefix("torch.")  # a torch.dtype
        if value is not None and value not in DTYPES:
            raise ValueError(f"`dtype` (={value!r}) must be one of {list(DTYPES)} or None.")
        return value

    def __getstate__(self) -> dict[Any, Any]:
        # Pickles carry no `api_key`: it is unused, and a pickle is not the place for a secret.
        state = super().__getstate__()
        return {**state, "__dict__": {**state["__dict__"], "api_key": None}}

    @property
    def max_tokens(self) -> int:
        """LangChain's name for `max_new_tokens`."""
        return self.max_new_tokens

    @max_tokens.setter
    def max_tokens(self, value: int) -> None:
        self.__pydantic_validator__.validate_assignment(self, "max_new_tokens", value)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with `update` applied: keys as the constructor takes them (aliases such as
        `max_tokens` included), unknown keys refused, values validated. The copy shares the
        loaded model and the engines built on it: a copy that changes the judge, `safecode`
        or `policy` gets an engine of its own on the same weights (nothing is reloaded, and
        switching between the two never reloads). A copy on another `model` starts afresh."""
        copy = super().model_copy(deep=deep)
        if not update:
            return copy
        check_settings(type(self), list(update))
        check_nested_settings(update)
        if "max_tokens" in update and "max_new_tokens" in update and update["max_tokens"] != update["max_new_tokens"]:
            raise SafeCoDeInputError("`max_tokens` and `max_new_tokens` are the same setting; give one of them.")
        for key, value in update.items():
            copy.__pydantic_validator__.validate_assignment(copy, "max_new_tokens" if key == "max_tokens" else key, value)
        if copy.model != self.model:
            copy._engines = Engines()  # another model: none of this one's engines (or wrapped objects) apply
        if copy.profile is not None and ({"policy", "model"} & set(update)):
            copy.profile = {**copy.profile, **copy._resolve_model_profile()}
            copy._note_tool_support()
        return copy

    # -- construction from loaded objects ---------------------------------------------------

    @classmethod
    def from_model(cls, model: Any, processor: Any, *, model_name: str | None = None, **kwargs: Any) -> ChatSafeCoDe:
        """Wrap a loaded `model` and `processor` (no loading, no copy). `kwargs` are the other fields.

        `model_name` names the model in answers (default: the folder it was loaded
        from, by its own name); it is also the `model` an unpickled copy loads."""
        name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        chat = cls(model=str(name), model_name=model_name, **kwargs)
        chat._engines.hf_objects = (model, processor)
        chat._engine(None)  # cheap without loading; checks the processor and judge, reads the template now
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
            "model_name": self.display_name(),  # cached answers report it
            "judge": judge_description(self.judge),
            "safecode": self.safecode.model_dump(mode="json"),
            "policy": self.policy.model_dump(mode="json"),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "do_sample": self.do_sample,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            # not "stop": LangChain overwrites that key with the call's own stop
            "default_stop": self.stop,
            "device": self.device,
            "dtype": self.dtype,
            "model_kwargs": self.model_kwargs,
        }

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        verdict = kwargs.get("verdict")
        if isinstance(verdict, Verdict):
            # A verdict handed in (e.g. by SafeCoDeMiddleware) keys the cache by what it says,
            # not by how long the judge took to say it.
            kwargs = {**kwargs, "verdict": verdict.model_dump(mode="json", exclude={"latency_s"})}
        return super()._get_llm_string(stop=stop, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
            ls_model_name=self.display_name(kwargs.get("model")),
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
            # Tools depend on the chat template: read from the model's files (no weights, no
            # network), then confirmed on the loaded processor (`_note_tool_support`). False
            # while no template can be found here (a hub id not in the local cache, the demo
            # model before its first build). Structured output is decoded under a grammar
            # (with llguidance installed: the `constrained` extra).
            tool_calling=bool(tool_calling_from_files(self.model)),
            structured_output=constrained.available(),
        )

    def display_name(self, model: str | None = None) -> str:
        """The name answers report for `model` (a per-call override) or this chat model's own:
        `model_name` when set, else the folder's own name, the hub id or "demo" (never a local path)."""
        if model is not None and str(model) != self.model:
            return public_name(str(model))
        return self.model_name or public_name(self.model)

    # -- tools and structured output -------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[Mapping[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | bool | Mapping[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, AIMessage]:
        """Offer `tools` to the model through its chat template's `tools=` argument.

        `tool_choice`: "auto"/None (the model decides), "none" (tools not
        offered), "any"/"required" or a tool's name (the answer is a call of a
        bound tool, or of that one, its arguments under the tool's grammar:
        they validate against its schema). `parallel_tool_calls=False`
        keeps only the first call. The model's template must support tools
        (checked on first use, or now when the model is already loaded):
        otherwise `UnsupportedModelError`. Under an unsafe verdict the answer
        carries no tool calls (see `response_metadata["safety"]["blocked_tool_calls"]`).

        `strict` is accepted: calls are always constrained (forced ones from
        their opening; under "auto" the text stays free until the model opens a
        call, then the call follows the tools' grammar), and read and validated
        after decoding as well.
        """
        del strict  # accepted for LangChain compatibility; see the docstring
        formatted = tools_mod.format_tools(tools)
        choice = tools_mod.normalize_tool_choice(tool_choice, tools_mod.tool_names(formatted))
        if self._engines.hf_objects is not None:  # loaded already: fail now, not on the first call
            tools_mod.forced_prefix(tool_template(self._engine(None)), choice, tools_mod.tool_names(formatted))
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: Mapping[str, Any] | type | None = None,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "json_schema",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, Any]:
        """Answers as `schema` (a pydantic class -> instances; a JSON schema / TypedDict -> dicts).

        `method="json_schema"` (default, as ChatOllama's): an answer decoded under
        the schema's grammar (any model); `"function_calling"`: a forced call of
        `schema` as the one tool (tool-capable templates); `"json_mode"`: JSON
        under the schema's grammar too, or any JSON object when `schema` is None
        (see `constrained`). Parse errors raise `OutputParserException`
        (a length cut its `StructuredOutputTruncatedError`); an unsafe verdict
        `ModelRefusalError`. With `include_raw=True` the result is
        `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` and nothing raises.
        """
        if kwargs:
            raise SafeCoDeInputError(f"Unsupported argument(s) {sorted(kwargs)} for with_structured_output.")
        return structured_output(self, schema, include_raw=include_raw, method=method, strict=strict)

    # -- the engine -------------------------------------------------------------------------

    def as_safecode_judge(self) -> ChatSafeCoDeJudge:
        """This chat model as a judge (what `make_judge(chat)` returns): its model's own self judge.

        Asked for a verdict as a chat model, its answer would be steered by its
        own judge; so it judges with a `SelfJudge` on its engine instead
        (unsteered, loaded on the first verdict, never here).
        """
        return ChatSafeCoDeJudge(self)

    @property
    def engine(self) -> SafeCoDe:
        """The `SafeCoDe` engine behind this chat model, loaded on first access.

        Share it (e.g. with a judge rail or agent middleware) instead of loading
        the model twice.
        """
        return self._engine(None)

    def _settings_key(self) -> tuple[Any, ...]:
        """What an engine holds besides the weights: the judge (a spec by value, an object by
        identity; it is kept alive with the engine, so its id stays its own) and the settings."""
        judge = self.judge if isinstance(self.judge, str) else ("object", id(self.judge))
        audit = self.audit_log if isinstance(self.audit_log, str | None) else id(self.audit_log)
        return (judge, self.safecode.model_dump_json(), self.policy.model_dump_json(), audit)

    def _engine(self, model: str | None) -> SafeCoDe:
        """The engine for `model` (None: the configured one), loading its weights on first use.

        Weights come from the process-wide registry (`loading.shared_model`), so
        every chat model naming the same weights shares one load; the engine
        adds this chat model's judge and settings, and costs no reload.
        """
        override = model is not None and model != self.model
        name = str(model) if override else self.model
        hf_objects = None if override else self._engines.hf_objects
        if hf_objects is not None:
            weights: Any = ("objects", id(hf_objects[0]))
        else:
            weights = weights_key(name, device=self.device, dtype=self.dtype, **self.model_kwargs)
        judge, config, policy, shown = self.judge, self.safecode, self.policy, self.display_name(name)
        audit = shared_audit_log(self.audit_log) if self.audit_log is not None else None

        def build() -> tuple[Any, SafeCoDe]:
            if hf_objects is not None:
                held: Any = hf_objects
                hf_model, processor = hf_objects
            else:
                held = shared_model(name, device=self.device, dtype=self.dtype, **self.model_kwargs)
                hf_model, processor = held.model, held.processor
            engine = SafeCoDe(hf_model, processor, config=config, judge=judge, policy=policy, model_name=shown)
            engine.audit_log = audit
            return (held, judge), engine  # the engine keeps neither the registry's holder nor a judge's id

        engine = self._engines.get(override, (name, weights, self._settings_key()), build)
        if not override:
            if name not in self._engines.tool_calling:
                try:
                    tool_template(engine)
                    self._engines.tool_calling[name] = True
                except UnsupportedModelError:
                    self._engines.tool_calling[name] = False
            self._note_tool_support()
        return engine

    def _note_tool_support(self) -> None:
        """`profile["tool_calling"]` from the loaded template, once it is known."""
        known = self._engines.tool_calling.get(self.model)
        if known is not None and self.profile is not None and self.profile.get("tool_calling") != known:
            self.profile = {**self.profile, "tool_calling": known}

    # -- token counting ---------------------------------------------------------------------

    def _counting_processor(self) -> tuple[Any, tuple[str, ...]]:
        """(processor, special strings) of the configured model, without loading its weights."""
        engine = self._engines.loaded(self.model)
        if engine is not None:
            return engine.processor, engine.specials
        if self._engines.hf_objects is not None:
            processor = self._engines.hf_objects[1]
            return processor, special_strings(processor)
        shared = loaded_model(weights_key(self.model, device=self.device, dtype=self.dtype, **self.model_kwargs))
        if shared is not None:  # another chat model of this process has these weights loaded
            return shared.processor, special_strings(shared.processor)
        with self._engines.lock:
            held = self._engines.processor
            if held is None or held[0] != self.model:
                held = self._engines.processor = (self.model, load_processor(self.model))
        return held[1], special_strings(held[1])

    def get_token_ids(self, text: str) -> list[int]:
        """The model's own token ids for `text` (no special tokens added); `custom_get_token_ids` wins."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        processor, _ = self._counting_processor()
        tokenizer = getattr(processor, "tokenizer", processor)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the prompt these messages make: rendered through the model's chat template
        (with `tools` when given), images expanded as the processor expands them.

        For a conversation the model can answer, this equals the answer's
        `usage_metadata["input_tokens"]`. A list ending with an assistant turn
        (as `trim_messages` may try) is counted without the generation prompt.
        """
        if not messages:
            return 0
        check_conversation(messages)
        processor, specials = self._counting_processor()
        turns = merge_turns(to_hf_messages(messages, self.policy))
        formatted = tools_mod.format_tools(tools) if tools else None
        images = [p["image"] for m in turns for p in m["content"] if p["type"] == "image"]
        prompt = render_prompt(
            processor, turns, specials, tools=formatted, add_generation_prompt=turns[-1]["role"] != "assistant"
        )
        return int(encode_views(processor, prompt, [images] if images else [])["input_ids"].shape[1])

    # -- the LLM cache ----------------------------------------------------------------------

    def _generate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        check_conversation(messages)  # before LangChain serialises them for the cache key
        view = cache_view(self, messages, kwargs)
        try:
            return BaseChatModel._generate_with_cache(view, messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            self._note_tool_support()  # the copy may have loaded the model

    async def _agenerate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        check_conversation(messages)
        view = cache_view(self, messages, kwargs)
        try:
            return await BaseChatModel._agenerate_with_cache(view, messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            self._note_tool_support()

    # -- one call ---------------------------------------------------------------------------

    def _call_settings(self, stop: list[str] | None, kwargs: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """(model override, keyword arguments for `SafeCoDe.stream`) for one call.

        Tool and JSON-mode options (`tools`, `tool_choice`, `parallel_tool_calls`,
        `response_format`) are checked here and left in `options` for `_plan`.
        """
        options = {k: v for k, v in kwargs.items() if k != "stream"}  # LangChain's own routing flag
        unknown = sorted(set(options) - set(CALL_OPTIONS))
        if "functions" in unknown:
            raise UnsupportedContentError(
                "Legacy `functions` are not supported; bind tools with llm.bind_tools([...]) instead."
            )
        if unknown:
            raise SafeCoDeInputError(
                f"Unknown option(s) {unknown} for ChatSafeCoDe. Per call it accepts {list(CALL_OPTIONS)} and stop."
            )
        given = [k for k in ("max_new_tokens", "max_tokens", "max_completion_tokens") if options.get(k) is not None]
        if len(given) > 1:
            raise SafeCoDeInputError(
                f"Give one of {given}: they are the same setting (`max_tokens` and `max_completion_tokens` "
                "are OpenAI's names for `max_new_tokens`)."
            )
        max_new_tokens = options[given[0]] if given else self.max_new_tokens
        engine_kwargs = {
            "max_new_tokens": max_new_tokens,
            "stop": list(stop) if stop is not None else self.stop,
            # None when no seed was set anywhere: the engine then draws fresh randomness per call
            "seed": options.get("seed", self.seed),
            "verdict": options.get("verdict"),
            **{
                k: v
                for k in ("presence_penalty", "frequency_penalty", "logit_bias")
                if (v := options.get(k, getattr(self, k, None))) is not None
            },
            **sampling_kwargs(
                options.get("temperature", self.temperature),
                options.get("top_p", self.top_p),
                options.get("top_k", self.top_k),
                options.get("do_sample", self.do_sample),
            ),
            # the options without a field of their own: per call only
            **{k: options[k] for k in _CALL_ONLY_SAMPLING if options.get(k) is not None},
        }
        return options.get("model"), engine_kwargs

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> Call:
        """Check the call, convert the messages (before any loading), load, judge, start decoding.

        The verdict is known before the first token (`SafeCoDe.stream` judges
        first). Under an unsafe verdict a forced opening would put the refusal
        inside a tool call's JSON or a JSON answer, so such a stream is closed
        before it decodes anything and reopened under the same verdict as plain
        text: no forced prefix, no JSON instruction, and no tools when a tool
        call was forced.
        """
        check_conversation(messages)
        refused = refused_already(messages)
        if refused is not None:
            # An agent loop (e.g. create_agent with response_format and no tools) asks again
            # after this model refused: answering again would loop; say it as LangChain does.
            raise ModelRefusalError(
                "Model refused to produce the requested output (category='unsafe'): its last answer was a "
                "refusal under an unsafe SafeCoDe verdict, and the conversation asks it to go on from there. "
                "In an agent, add safecode_guard.middleware.SafeCoDeMiddleware, which ends the run with the "
                "refusal; elsewhere, end the conversation with a user turn.",
                raw_message=refused,
            )
        model, engine_kwargs = self._call_settings(stop, kwargs)
        verdict = engine_kwargs.pop("verdict", None)
        sampling = SamplingParams.build(**engine_kwargs)  # refused before loading, as the engine words it
        tools = tools_mod.format_tools(kwargs["tools"]) if kwargs.get("tools") else None
        names = tools_mod.tool_names(tools) if tools else []
        if tools:
            tools_mod.normalize_tool_choice(kwargs.get("tool_choice"), names)
        if kwargs.get("tool_choice") not in (None, "auto", "none") and not tools:
            raise SafeCoDeInputError(
                f"`tool_choice` (={kwargs['tool_choice']!r}) was given without tools. Use llm.bind_tools(tools, tool_choice=...)."
            )
        if kwargs.get("response_format") is not None:
            response_format_schema(kwargs["response_format"])
        # before loading (bad input is refused without loading weights): images shrink to the
        # policy's working cap here, and to what the processor needs inside the engine
        hf_messages = to_hf_messages(messages, self.policy)
        engine = self._engine(model)
        retry = Retry(self.max_retries, self.timeout)  # the deadline runs from here: loading is not counted
        call = open_call(
            engine, hf_messages, sampling, tools=tools, tool_choice=kwargs.get("tool_choice"),
            parallel_tool_calls=kwargs.get("parallel_tool_calls"), response_format=kwargs.get("response_format"),
            verdict=verdict, retry=retry,
        )
        return Call(
            engine=call.engine, pieces=call.pieces, plan=call.plan, verdict=call.verdict, check=call.check,
            model_name=self.display_name(model),
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # One reading of the answer for every path: `invoke` is the merge of the chunks `stream`
        # yields, so text, tool calls, invalid calls and metadata agree by construction.
        call = self._start(messages, stop, kwargs)
        chunks: list[AIMessageChunk] = []
        try:
            for chunk in answer_chunks(call):
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                chunks.append(chunk.message)  # type: ignore[arg-type]
        finally:
            call.pieces.close()
        merged = chunks[0] + chunks[1:] if len(chunks) > 1 else chunks[0]
        message = replace_unsafe_answer(message_chunk_to_message(merged), call.engine.config.answer_refusal)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        call = self._start(messages, stop, kwargs)
        try:
            for chunk in answer_chunks(call):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            call.pieces.close()  # an abandoned stream releases the engine here, in the thread that holds it

    async def _astart(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> Call:
        """`_start` on a preparation thread (images, loading, the judge block); the caller's context goes along."""
        # in a short-lived thread (`control.arun_briefly`); the judge hand-off and LangChain's
        # tracing ride along on the copied context
        return await arun_briefly(lambda: self._start(messages, stop, kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # Decoding is awaited on the model's scheduler: no thread is held per call, so any
        # number of concurrent `ainvoke`s / `abatch` items are decoded together.
        call = await self._astart(messages, stop, kwargs)
        chunks: list[AIMessageChunk] = []
        try:
            async for chunk in aanswer_chunks(call):
                if run_manager and chunk.text:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                chunks.append(chunk.message)  # type: ignore[arg-type]
        finally:
            call.pieces.close()
        merged = chunks[0] + chunks[1:] if len(chunks) > 1 else chunks[0]
        message = replace_unsafe_answer(message_chunk_to_message(merged), call.engine.config.answer_refusal)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        call = await self._astart(messages, stop, kwargs)
        try:
            async for chunk in aanswer_chunks(call):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            call.pieces.close()  # a consumer that stops early (or is cancelled) stops decoding
