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

Tools (`bind_tools`, SPEC section 4; `safecode_guard.tools`): the tool
schemas go through the chat template's own `tools=`; the answer is split
into text and `tool_calls` (`<tool_call>{json}</tool_call>` or plain-JSON
calls; unreadable calls land in `invalid_tool_calls`). `tool_choice` "any" or
a tool name opens the answer with the template's call prefix. When the
verdict is unsafe the answer carries NO tool calls: whatever the model tried
to call is listed in `safety["blocked_tool_calls"]` instead (the key is there,
maybe empty, whenever tools were bound). Streaming sends each call as one
`tool_call_chunks` chunk once its closing tag arrives; blocked calls ride on
the last chunk's `safety`. `with_structured_output` works through a forced
tool call (default) or a JSON mode (`method="json_schema"`), and raises
LangChain's `ModelRefusalError` under an unsafe verdict.

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
import json
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import (
    InvalidToolCall,
    ToolCall,
    ToolCallChunk,
    invalid_tool_call,
    tool_call_chunk,
)
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
)
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from . import ops
from . import tools as tools_mod
from .config import InputPolicy, SafeCoDeConfig
from .errors import SafeCoDeInputError, UnsupportedContentError, UnsupportedModelError
from .lc_messages import to_hf_messages
from .prompting import render_prompt
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
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "do_sample",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "verdict",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
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


# --------------------------------------------------------------------------- tools and JSON mode


@dataclass(frozen=True)
class CallPlan:
    """How one call uses tools or JSON mode: what the prompt gets and how the answer is read."""

    names: tuple[str, ...] | None = None
    """The bound tools' names; None when no tools are bound (no tool parsing, no `blocked_tool_calls`)."""
    parse: bool = False
    """Read tool calls out of the answer (False for `tool_choice="none"` and JSON mode)."""
    prefix: str = ""
    """The answer's forced opening (a tool call's start, or "{" in JSON mode); part of the answer."""
    parallel: bool = True
    """False keeps only the first valid call (`parallel_tool_calls=False`); later ones become invalid."""


_TEMPLATES: weakref.WeakKeyDictionary[Any, tuple[str, tools_mod.ToolTemplate]] = weakref.WeakKeyDictionary()
_TEMPLATES_LOCK = threading.Lock()


def tool_template(engine: SafeCoDe) -> tools_mod.ToolTemplate:
    """What `engine`'s chat template does with tools, probed once per template (`UnsupportedModelError` if nothing)."""
    processor = engine.processor
    template = getattr(processor, "chat_template", None) or getattr(engine.tokenizer, "chat_template", None)
    key = str(template)
    with _TEMPLATES_LOCK:
        held = _TEMPLATES.get(engine)
        if held is not None and held[0] == key:
            return held[1]

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool) -> str:
        return render_prompt(processor, messages, engine._specials, tools=tools, add_generation_prompt=gen)

    probed = tools_mod.probe_tool_template(render, repr(engine.model_name))
    with _TEMPLATES_LOCK:
        _TEMPLATES[engine] = (key, probed)
    return probed


def _uses_tools(hf_messages: Sequence[Mapping[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in hf_messages)


def _response_format_schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema of an OpenAI-style `response_format` (None for plain JSON mode)."""
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "json_object":
        return None
    if kind == "json_schema":
        inner = response_format.get("json_schema", response_format)
        schema = inner.get("schema") if isinstance(inner, Mapping) else None
        if isinstance(schema, Mapping):
            return dict(schema)
    raise SafeCoDeInputError(
        f"`response_format` (={response_format!r}) must be {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}. Or use with_structured_output(schema)."
    )


@dataclass
class AnswerReader:
    """Reads an answer's text under a `CallPlan`: text, tool calls, and calls blocked by an unsafe verdict.

    `feed` / `finish` return `(text, tool_call_chunks)` pairs for streaming;
    the same calls land in `tool_calls` / `invalid_tool_calls` / `blocked`
    for `invoke`, so both paths read an answer the same way.
    """

    plan: CallPlan | None
    unsafe: bool
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    blocked: list[dict[str, Any]] = field(default_factory=list)
    _splitter: tools_mod.ToolCallSplitter | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.plan is not None and self.plan.parse:
            self._splitter = tools_mod.ToolCallSplitter()

    def feed(self, text: str) -> list[tuple[str, list[ToolCallChunk]]]:
        events = self._splitter.feed(text) if self._splitter else ([text] if text else [])
        return self._convert(events)

    def finish(self) -> list[tuple[str, list[ToolCallChunk]]]:
        return self._convert(self._splitter.finish()) if self._splitter else []

    def _convert(self, events: list[tools_mod.Event]) -> list[tuple[str, list[ToolCallChunk]]]:
        out: list[tuple[str, list[ToolCallChunk]]] = []
        for event in events:
            if isinstance(event, str):
                self.content += event
                out.append((event, []))
                continue
            assert self.plan is not None and self.plan.names is not None
            call: Any = tools_mod.parse_raw_call(event, self.plan.names)
            if self.unsafe:
                self.blocked.append(dict(call))  # an unsafe scene must not trigger actions
                continue
            if call["type"] == "tool_call" and self.tool_calls and not self.plan.parallel:
                call = invalid_tool_call(
                    name=call["name"], args=json.dumps(call["args"]), id=call["id"],
                    error="parallel_tool_calls=False: only the first tool call is kept",
                )
            index = len(self.tool_calls) + len(self.invalid_tool_calls)
            if call["type"] == "tool_call":
                self.tool_calls.append(call)
                args = json.dumps(call["args"], ensure_ascii=False)
            else:
                self.invalid_tool_calls.append(call)
                # A JSON string, never an object: LangChain's chunk merging repairs truncated
                # JSON objects, which would turn a cut-off call into a runnable one.
                args = json.dumps(call["args"], ensure_ascii=False)
            out.append(("", [tool_call_chunk(name=call["name"], args=args, id=call["id"], index=index)]))
        return out


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
    the next different override), `max_new_tokens` (or `max_tokens`,
    `max_completion_tokens`), `temperature`, `top_p`, `top_k`, `do_sample`,
    `seed`, `stop`, `presence_penalty`, `frequency_penalty`, `logit_bias`, and
    `verdict` ("safe" / "unsafe" / a `Verdict`: skip the judge, `source="override"`).

    Tools: `llm.bind_tools([...], tool_choice=...)` for models whose chat
    template takes tools; `llm.with_structured_output(schema)`. Under an
    unsafe verdict answers carry no tool calls (`safety["blocked_tool_calls"]`).
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
        engine = chat._engine(None)  # cheap without loading; checks the processor and judge now
        if chat.profile is not None:
            # loaded objects: the template can be asked now (a model loaded by path says False until used)
            try:
                tool_template(engine)
                supports_tools = True
            except UnsupportedModelError:
                supports_tools = False
            chat.profile = {**chat.profile, "tool_calling": supports_tools}
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
            # Tools depend on the chat template, unknown until the model is loaded; `from_model`
            # probes it. No native structured output: `with_structured_output` uses a tool or JSON mode.
            tool_calling=False,
            structured_output=False,
        )

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
        offered), "any"/"required" (the answer opens a call), or a tool's name
        (the answer opens a call of that tool). `parallel_tool_calls=False`
        keeps only the first call. The model's template must support tools
        (checked on first use, or now when the model is already loaded):
        otherwise `UnsupportedModelError`. Under an unsafe verdict the answer
        carries no tool calls (see `response_metadata["safety"]["blocked_tool_calls"]`).

        `strict` is accepted and has no effect: without constrained decoding a
        local model cannot promise schema-exact arguments, so validate them
        where they are used (`with_structured_output` does).
        """
        del strict  # accepted for LangChain compatibility; see the docstring
        formatted = tools_mod.format_tools(tools)
        choice = tools_mod.normalize_tool_choice(tool_choice, tools_mod.tool_names(formatted))
        if self._hf_objects is not None:  # loaded already: fail now, not on the first call
            tools_mod.forced_prefix(tool_template(self._engine(None)), choice, tools_mod.tool_names(formatted))
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = parallel_tool_calls
        return self.bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: Mapping[str, Any] | type,
        *,
        include_raw: bool = False,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[Any, Any]:
        """Answers as `schema` (a pydantic class -> instances; a JSON schema / TypedDict -> dicts).

        `method="function_calling"` (default) binds `schema` as the one tool and
        forces a call of it (needs a tool-capable template); `"json_schema"`
        puts the schema in a system instruction and opens the answer with "{"
        (any model); `"json_mode"` asks for JSON without a schema. Parse errors
        raise `OutputParserException`; an unsafe verdict raises
        `ModelRefusalError`. With `include_raw=True` the result is
        `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` and nothing raises.
        """
        if kwargs:
            raise SafeCoDeInputError(f"Unsupported argument(s) {sorted(kwargs)} for with_structured_output.")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm: Runnable[Any, Any] = self.bind_tools([schema], tool_choice=name, strict=strict, **trace)
            inner = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
            parser: Runnable[Any, Any] = tools_mod.ToolsAnswerParser(inner=inner)
        elif method in ("json_schema", "json_mode"):
            if method == "json_mode":
                response_format: dict[str, Any] = {"type": "json_object"}
            else:
                response_format = {"type": "json_schema", "json_schema": {"schema": convert_to_json_schema(schema)}}
            llm = self.bind(response_format=response_format, **trace)
            inner = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
            parser = tools_mod.JsonAnswerParser(inner=inner)
        else:
            raise SafeCoDeInputError(
                f"`method` (={method!r}) must be 'function_calling', 'json_schema' or 'json_mode'."
            )
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        keep_raw = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([keep_raw], exception_key="parsing_error")

    # -- the engine -------------------------------------------------------------------------

    @property
    def engine(self) -> SafeCoDe:
        """The `SafeCoDe` engine behind this chat model, loaded on first access.

        Share it (e.g. with a judge rail or agent middleware) instead of loading
        the model twice.
        """
        return self._engine(None)

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
            "seed": options.get("seed", self.seed),
            "verdict": options.get("verdict"),
            **{k: options[k] for k in ("presence_penalty", "frequency_penalty", "logit_bias") if options.get(k) is not None},
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
    ) -> tuple[SafeCoDe, SafeCoDeStream, CallPlan | None]:
        """Check the call, convert the messages (before any loading), load, judge, start decoding."""
        model, engine_kwargs = self._call_settings(stop, kwargs)
        tools = tools_mod.format_tools(kwargs["tools"]) if kwargs.get("tools") else None
        names = tools_mod.tool_names(tools) if tools else []
        choice = tools_mod.normalize_tool_choice(kwargs.get("tool_choice"), names) if tools else "auto"
        if kwargs.get("tool_choice") not in (None, "auto", "none") and not tools:
            raise SafeCoDeInputError(
                f"`tool_choice` (={kwargs['tool_choice']!r}) was given without tools. Use llm.bind_tools(tools, tool_choice=...)."
            )
        json_schema: dict[str, Any] | None = None
        json_mode = kwargs.get("response_format") is not None
        if json_mode:
            if tools:
                raise SafeCoDeInputError(
                    "Give `tools` or `response_format`, not both: JSON mode answers with one JSON object, "
                    "tool calling with calls. For a schema-shaped answer with tools, bind the schema as a tool."
                )
            json_schema = _response_format_schema(kwargs["response_format"])
        hf_messages = to_hf_messages(messages, self.policy)
        engine = self._engine(model)
        plan: CallPlan | None = None
        if tools or _uses_tools(hf_messages):
            template = tool_template(engine)  # UnsupportedModelError when the template has no tools
            if tools:
                plan = CallPlan(
                    names=tuple(names),
                    parse=choice != "none",
                    prefix=tools_mod.forced_prefix(template, choice, names),
                    parallel=kwargs.get("parallel_tool_calls") is not False,
                )
                if choice != "none":  # "none": the tools are not offered at all
                    engine_kwargs["tools"] = tools
        if json_mode:
            plan = CallPlan(prefix="{")
            instruction = {"role": "system", "content": [{"type": "text", "text": tools_mod.json_instruction(json_schema)}]}
            hf_messages = [instruction, *hf_messages]
        if plan is not None and plan.prefix:
            engine_kwargs["answer_prefix"] = plan.prefix
        return engine, engine.stream(hf_messages, **engine_kwargs), plan

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine, pieces, plan = self._start(messages, stop, kwargs)
        try:
            for piece in pieces:
                if run_manager:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                    run_manager.on_llm_new_token(piece, chunk=chunk)
        finally:
            pieces.close()
        result = pieces.result
        assert result is not None and result.verdict is not None  # set once iteration ends
        reader = AnswerReader(plan, unsafe=result.verdict.label == "unsafe")
        reader.feed((plan.prefix if plan else "") + result.text)
        reader.finish()
        safety = safety_metadata(result.verdict, engine.config, result.refused)
        if plan is not None and plan.names is not None:
            safety["blocked_tool_calls"] = reader.blocked
        message = AIMessage(
            content=reader.content,
            tool_calls=reader.tool_calls,
            invalid_tool_calls=reader.invalid_tool_calls,
            response_metadata={
                "safety": safety,
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
        engine, pieces, plan = self._start(messages, stop, kwargs)
        try:
            for chunk in _chunks(engine, pieces, plan):
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


def _chunks(engine: SafeCoDe, pieces: SafeCoDeStream, plan: CallPlan | None = None) -> Iterator[ChatGenerationChunk]:
    """Engine text pieces as LangChain chunks: `safety` on the first, the accounting on the last.

    Text is held back only until `refusal_decision` can fill `safety["refused"]`
    (decided on the engine's text, as `invoke` does). With tools bound, an
    `AnswerReader` turns the text into content and one `tool_call_chunks`
    chunk per finished call; calls blocked by an unsafe verdict ride on the
    last chunk's `safety["blocked_tool_calls"]`.
    """
    verdict = pieces.verdict
    assert verdict is not None  # SafeCoDe.stream decides the verdict before returning
    reader = AnswerReader(plan, unsafe=verdict.label == "unsafe")
    pending = reader.feed(plan.prefix) if plan is not None else []
    held, refused = "", None
    for piece in pieces:
        pending.extend(reader.feed(piece))
        if refused is None:
            held += piece
            refused = refusal_decision(held, engine.config.refusal_phrases)
            if refused is not None:
                yield _first_chunk(pending, verdict, engine.config, refused, plan)
                pending = []
            continue
        yield from (_chunk(text, calls) for text, calls in pending)
        pending = []
    pending.extend(reader.finish())
    result = pieces.result
    assert result is not None
    if refused is None:  # the answer ended before its opening decided (e.g. an empty answer)
        yield _first_chunk(pending, verdict, engine.config, result.refused, plan)
        pending = []
    yield from (_chunk(text, calls) for text, calls in pending)
    last_meta: dict[str, Any] = {"model_name": engine.model_name, "finish_reason": result.finish_reason}
    if reader.blocked:
        # merged into the first chunk's `safety` dict (LangChain merges nested dicts key by key)
        last_meta["safety"] = {"blocked_tool_calls": reader.blocked}
    yield ChatGenerationChunk(
        message=AIMessageChunk(
            content="",
            chunk_position="last",
            response_metadata=last_meta,
            usage_metadata=usage_metadata(result),
        )
    )


def _chunk(text: str, calls: list[ToolCallChunk]) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=text, tool_call_chunks=calls))


def _first_chunk(
    pending: list[tuple[str, list[ToolCallChunk]]],
    verdict: Verdict,
    config: SafeCoDeConfig,
    refused: bool,
    plan: CallPlan | None,
) -> ChatGenerationChunk:
    safety = safety_metadata(verdict, config, refused)
    if plan is not None and plan.names is not None:
        safety["blocked_tool_calls"] = []
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content="".join(text for text, _ in pending),
            tool_call_chunks=[c for _, calls in pending for c in calls],
            response_metadata={"safety": safety, "model_provider": PROVIDER},
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
