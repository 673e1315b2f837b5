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

Output flow: the engine's text pieces -> `_chunks` (an `AnswerReader`
splits text and tool calls) -> `ChatGenerationChunk`s. `stream` yields them;
`invoke` merges those same chunks into one `AIMessage`, so the two agree on
everything (text, tool calls, invalid calls, metadata) by construction.

- invoke / batch / ainvoke / abatch: one `AIMessage` holding the answer only
  (no prompt echo, stop string excluded). `response_metadata` holds `safety`
  (SPEC section 5, built by `safety_metadata`, with a guard judge's hazard
  `categories`), `model_name`,
  `finish_reason` and `model_provider="safecode"`; `usage_metadata` the real
  token counts of the prompt and the answer.
- stream / astream / astream_events / stream_events: text chunks as the
  engine decodes them. The FIRST chunk carries `safety` (and
  `model_provider`); the LAST chunk (`chunk_position="last"`) carries
  `model_name`, `finish_reason` and `usage_metadata`. Each rides on exactly
  one chunk, so merged chunks hold the same metadata as `invoke`
  (LangChain's merge concatenates repeated strings and sums numbers).
  With `SafeCoDeConfig.check_answer` the judge also classifies the finished
  answer: `invoke` replaces an unsafe one by `answer_refusal`
  (`replace_unsafe_answer`); a stream's text is out already, so its last
  chunk only flags it (`safety["answer_check"]`).
  `safety["refused"]` describes how the answer opens, so the first chunk
  goes out as soon as the opening settles it (`refusal_decision`): usually
  within the first few tokens, always before any text is shown.

Tools (`bind_tools`, SPEC section 4; `safecode_guard.tools`): the tool
schemas go through the chat template's own `tools=`; the answer is split
into text and `tool_calls` (`<tool_call>{json}</tool_call>` or plain-JSON
calls). Unreadable calls land in `invalid_tool_calls` with `args` = the raw
call text as a JSON string (so no chunk merge can "repair" a cut-off call
into a runnable one) and the reason in
`response_metadata["invalid_tool_call_errors"][call_id]`. `tool_choice` "any"
or a tool name opens the answer with the template's call prefix. When the
verdict is unsafe the answer carries NO tool calls: whatever the model tried
to call is listed in `safety["blocked_tool_calls"]` instead (the key is there,
maybe empty, whenever tools were bound), and a forced opening (a forced tool
call, JSON mode's "{") gives way to a plain-text refusal. Streaming sends
each call as one `tool_call_chunks` chunk once its closing tag arrives;
blocked calls ride on the last chunk's `safety`. `with_structured_output`
works through a forced tool call (default) or a JSON mode
(`method="json_schema"`), and raises LangChain's `ModelRefusalError` under an
unsafe verdict.

Async never blocks the event loop: `ainvoke` runs the engine in a worker
thread (LangChain's default `_agenerate`), and `astream` runs the sync
stream in one dedicated thread that hands chunks over through an
`asyncio.Queue` (one thread, because the engine's lock must be released by
the thread that took it). One instance is safe to share between threads:
the engine serialises calls and loading happens once.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.caches import BaseCache
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import ModelRefusalError
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import ToolCallChunk, invalid_tool_call, tool_call_chunk
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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from . import tools as tools_mod
from .config import InputPolicy, SafeCoDeConfig
from .errors import (
    JudgeBusyError,
    JudgeError,
    OverloadedError,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
    did_you_mean,
)
from .judges import ChatModelJudge, ChatSafeCoDeJudge, FixedJudge, SelfJudge, make_judge
from .lc_messages import to_hf_messages
from .ops import refusal_decision
from .prompting import render_prompt
from .verdict import Verdict, answer_check_metadata, safety_metadata

if TYPE_CHECKING:
    from .engine.core import SafeCoDe
    from .engine.results import SafeCoDeResult, SafeCoDeStream

__all__ = [
    "ChatSafeCoDe",
    "answer_check_metadata",
    "images_inline",
    "init_chat_model",
    "judge_fingerprint",
    "refusal_decision",
    "replace_unsafe_answer",
    "safety_metadata",
]

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


def replace_unsafe_answer(message: AIMessage, refusal: str) -> AIMessage:
    """`message` with its content replaced by `refusal` when its answer check found it unsafe.

    For answers not yet shown (`invoke`, a non-streamed HTTP answer): tool calls
    go too (listed in `safety["blocked_tool_calls"]`), and `answer_check["replaced"]`
    says so. Any other message is returned as it is.
    """
    safety = message.response_metadata.get("safety") or {}
    check = safety.get("answer_check")
    if not isinstance(check, dict) or check.get("verdict") != "unsafe":
        return message
    blocked = [*(safety.get("blocked_tool_calls") or []), *map(dict, message.tool_calls), *map(dict, message.invalid_tool_calls)]
    new_safety = {**safety, "answer_check": {**check, "replaced": True}}
    if blocked or "blocked_tool_calls" in safety:
        new_safety["blocked_tool_calls"] = blocked
    return AIMessage(
        content=refusal,
        id=message.id,
        response_metadata={**message.response_metadata, "safety": new_safety},
        usage_metadata=message.usage_metadata,
    )


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


# --------------------------------------------------------------------------- LLM cache keys
#
# LangChain's LLM cache keys an answer on the serialised messages plus `_get_llm_string`
# (our `_identifying_params` and the call's options). Two things decide a SafeCoDe answer
# that those may not describe: the judge (its verdict steers decoding) and the pixels of
# images the request only points to. `ChatSafeCoDe._generate_with_cache` bypasses the
# cache when either is not covered by the key.


def judge_fingerprint(judge: Any) -> str | None:
    """A stable string that identifies what `judge` decides, or None when nothing does.

    - a spec string ("self", "fixed:unsafe", "chat:openai:gpt-4o") is its own description;
    - `FixedJudge` and an unbound `SelfJudge` are described by their settings
      (`FixedJudge("unsafe")` and "fixed:unsafe" share a key);
    - a LangChain chat model (or a `ChatModelJudge` around one) by a digest of the
      model's own LangChain cache key (its class and identifying parameters);
    - any judge object may describe itself with a non-empty string attribute
      `cache_key` (e.g. `my_judge.cache_key = "keyword-judge-v2"`).

    Everything else (functions, lambdas, custom judge classes without `cache_key`,
    a `SelfJudge` bound to another engine) has no description that tells two of
    them apart, so `ChatSafeCoDe` never caches answers that such a judge decided.
    """
    if isinstance(judge, str):
        return "spec:" + judge.strip()
    own = getattr(judge, "cache_key", None)
    if isinstance(own, str) and own:
        return "key:" + own
    if type(judge) is FixedJudge:
        return "spec:" + judge.name
    if type(judge) is SelfJudge and judge.engine is None:
        return f"spec:{judge.name}:caption_max_new_tokens={judge.caption_max_new_tokens}"
    model, name = (judge.chat_model, judge.name) if type(judge) is ChatModelJudge else (judge, "")
    if isinstance(model, BaseChatModel):
        try:
            described = model._get_llm_string()
        except Exception:  # a chat model that cannot describe itself cannot be told apart
            return None
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        # a digest: the judge model's settings may hold secrets, and cache keys may be stored
        return "chat-model:" + hashlib.sha256(f"{kind}|{name}|{described}".encode()).hexdigest()
    return None


def _judge_description(judge: Any) -> str:
    """`_identifying_params["judge"]`: the fingerprint, or a readable name marked uncacheable."""
    fingerprint = judge_fingerprint(judge)
    if fingerprint is not None:
        return fingerprint
    name = getattr(judge, "name", None) or getattr(judge, "__name__", None) or ""
    return f"uncacheable:{type(judge).__module__}.{type(judge).__qualname__}:{name}"


def _inline_image_block(block: Mapping[str, Any]) -> bool:
    """Whether a v1 content block is not an image, or an image whose bytes are in the block itself."""
    kind = block.get("type")
    if kind == "non_standard":  # e.g. OpenAI's {"type": "image_url", "image_url": "<url>"} shorthand
        value = block.get("value")
        if not (isinstance(value, Mapping) and value.get("type") == "image_url"):
            return True
        url = value.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        return isinstance(url, str) and url.lstrip()[:5].lower() == "data:"
    if kind != "image":
        return True
    if block.get("base64") is not None:
        return True
    if block.get("url") is not None:
        url = block["url"]
        return isinstance(url, str) and url.lstrip()[:5].lower() == "data:"
    # Encoded bytes serialise whole; a PIL image serialises as its repr (size and memory
    # address), a string may be a path: neither covers the pixels.
    return isinstance(block.get("image"), (bytes, bytearray))


def images_inline(messages: Sequence[BaseMessage]) -> bool:
    """Whether every image in `messages` carries its bytes in the messages themselves.

    True for base64 blocks, data URLs and encoded bytes. False when any image
    is a reference read at request time (an http(s) or file:// URL, a path) or
    an in-memory PIL image: the serialised messages, which key LangChain's
    cache, then do not cover the pixels the model would see.
    """
    for message in messages:
        if isinstance(message.content, str):
            continue
        try:
            blocks = message.content_blocks
        except (ValueError, TypeError, KeyError):
            return False  # malformed: the call itself reports it
        if not all(_inline_image_block(b) for b in blocks if isinstance(b, Mapping)):
            return False
    return True


def _storable(generation: Any) -> bool:
    """Whether an answer may be cached: not one decided by a fallback verdict (a failed judge)."""
    message = getattr(generation, "message", None)
    safety = (getattr(message, "response_metadata", None) or {}).get("safety") or {}
    return safety.get("source") != "fallback" and safety.get("error") is None


class _VerdictAwareCache(BaseCache):
    """The application's LLM cache, minus answers made under a fallback verdict.

    A fallback verdict (the judge timed out or failed, `on_judge_error` decided)
    says something about that moment, not about the request: cached, it would
    keep serving a fail-closed refusal (or a fail-open answer) after the judge
    recovered. Lookups pass through unchanged.
    """

    def __init__(self, inner: BaseCache) -> None:
        self.inner = inner

    def lookup(self, prompt: str, llm_string: str) -> Any:
        return self.inner.lookup(prompt, llm_string)

    def update(self, prompt: str, llm_string: str, return_val: Any) -> None:
        if all(_storable(g) for g in return_val):
            self.inner.update(prompt, llm_string, return_val)

    def clear(self, **kwargs: Any) -> None:
        self.inner.clear(**kwargs)

    async def alookup(self, prompt: str, llm_string: str) -> Any:
        return await self.inner.alookup(prompt, llm_string)

    async def aupdate(self, prompt: str, llm_string: str, return_val: Any) -> None:
        if all(_storable(g) for g in return_val):
            await self.inner.aupdate(prompt, llm_string, return_val)

    async def aclear(self, **kwargs: Any) -> None:
        await self.inner.aclear(**kwargs)


# --------------------------------------------------------------------------- constructor keys

#: LangChain's standard constructor keys that have no meaning for a model running in this
#: process, each with what to do instead. They are refused, not silently dropped.
_NOT_FOR_LOCAL_MODELS = {
    "base_url": "ChatSafeCoDe runs the model in this process. For a server, run `safecode-guard serve` "
    "and use an OpenAI-compatible client",
    "streaming_callback": "use callbacks=[...] or llm.stream(...)",
}

#: Names other integrations use for a setting we have under another name.
_OTHER_NAMES = {
    "model_id": "model",
    "model_path": "model",
    "max_output_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "stop_sequences": "stop",
    "judge_spec": "judge",
    "config": "safecode",
    "safecode_config": "safecode",
    "input_policy": "policy",
}


def _nested_settings() -> dict[str, str]:
    from .config import InputPolicy, SafeCoDeConfig

    out = {name: f"safecode=SafeCoDeConfig({name}=...)" for name in SafeCoDeConfig.model_fields}
    out.update({name: f"policy=InputPolicy({name}=...)" for name in InputPolicy.model_fields})
    return out


def _setting_hint(key: str, valid: Sequence[str]) -> str:
    """What to write instead of the unknown constructor key `key`."""
    if key in _NOT_FOR_LOCAL_MODELS:
        return f"`{key}`: {_NOT_FOR_LOCAL_MODELS[key]}"
    nested = _nested_settings()
    if key in nested:
        return f"`{key}` is a SafeCoDe setting: pass {nested[key]}"
    if key in _OTHER_NAMES:
        return f"`{key}`: use `{_OTHER_NAMES[key]}`"
    candidates = {**{v: f"`{v}`" for v in valid}, **{k: nested[k] for k in nested}}
    close = did_you_mean(key, candidates)
    if close:
        return f"`{key}`: did you mean {candidates[close]}"
    return f"`{key}` is not a ChatSafeCoDe setting"


def check_nested_settings(data: Mapping[str, Any]) -> None:
    """`SafeCoDeInputError` for an unknown key in a `safecode=` or `policy=` given as a mapping
    (as config.yml gives them), naming the key and the closest valid one."""
    from .config import InputPolicy, SafeCoDeConfig

    for name, config_class in (("safecode", SafeCoDeConfig), ("policy", InputPolicy)):
        value = data.get(name)
        if not isinstance(value, Mapping):
            continue
        valid = list(config_class.model_fields)
        unknown = [str(k) for k in value if k not in config_class.model_fields]
        if unknown:
            hints = []
            for key in unknown:
                close = did_you_mean(key, valid)
                hints.append(f"`{key}`" + (f" (did you mean `{close}`?)" if close else ""))
            raise SafeCoDeInputError(
                f"Unknown setting(s) in `{name}` ({config_class.__name__}): {', '.join(hints)}. "
                f"Valid keys: {valid}."
            )


def check_settings(model_class: type[BaseModel], keys: Sequence[str]) -> None:
    """`SafeCoDeInputError` naming every key that is not a field (or alias) of `model_class`, and its fix."""
    valid = {n for n, f in model_class.model_fields.items()} | {
        f.alias for f in model_class.model_fields.values() if f.alias
    }
    unknown = [k for k in keys if k not in valid]
    if unknown:
        ours = sorted(n for n in valid if n in ChatSafeCoDe.__annotations__ or n == "max_tokens")
        raise SafeCoDeInputError(
            "Unknown setting(s) for ChatSafeCoDe: "
            + "; ".join(_setting_hint(str(k), sorted(valid)) for k in unknown)
            + f". Its own settings are {ours}, plus LangChain's (cache, callbacks, tags, metadata, "
            "rate_limiter, disable_streaming, output_version, profile, ...)."
        )


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


def tool_calling_from_files(model: str) -> bool | None:
    """Whether `model`'s chat template takes tools, read from its files without loading anything.

    The template found on disk (`loading.chat_template_source`) goes through the
    same probe as a loaded one (`tools.probe_tool_template`), rendered by
    transformers' own template engine. None when no template is found here.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    from .engine.loading import chat_template_source

    try:
        template = chat_template_source(model)
    except Exception:  # an unreadable folder or cache entry: unknown here; loading reports it
        return None
    if isinstance(template, list):  # a tokenizer's named templates: transformers takes "tool_use" for tools
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("tool_use") or named.get("default")
    if not isinstance(template, str):
        return None

    def render(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, gen: bool) -> str:
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template, add_generation_prompt=gen)
        return rendered[0]

    try:
        tools_mod.probe_tool_template(render, repr(model))
    except UnsupportedModelError:
        return False
    return True


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
            tools_mod.check_nesting(schema, "The `response_format` schema")
            return dict(schema)
    raise SafeCoDeInputError(
        f"`response_format` (={response_format!r}) must be {{'type': 'json_object'}} or "
        "{'type': 'json_schema', 'json_schema': {'schema': {...}}}. Or use with_structured_output(schema)."
    )


@dataclass
class AnswerReader:
    """Reads an answer's text under a `CallPlan` into `(text, tool_call_chunks)` pairs.

    The pairs become the stream's chunks, and `invoke` merges those same chunks,
    so both paths read an answer identically by construction. A valid call is
    one chunk whose `args` is its arguments as a JSON object. An invalid call
    (malformed, unknown tool, cut off, or a second call under
    `parallel_tool_calls=False`) is one chunk whose `args` is the call's raw
    text as a JSON *string*: LangChain's chunk merging repairs truncated JSON
    objects (`{"a": 1` -> `{"a": 1}`), which would make a cut-off call
    runnable, while a string always stays an invalid call. `json.loads(args)`
    gives back what the model wrote; the reason is kept in `errors` (merging
    drops `InvalidToolCall.error`). Calls made under an unsafe verdict go to
    `blocked` instead, as parsed (`ToolCall` or `InvalidToolCall` dicts).
    """

    plan: CallPlan | None
    unsafe: bool
    blocked: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    valid_calls: int = 0
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
                out.append((event, []))
                continue
            assert self.plan is not None and self.plan.names is not None
            call: Any = tools_mod.parse_raw_call(event, self.plan.names)
            if self.unsafe:
                self.blocked.append(dict(call))  # an unsafe scene must not trigger actions
                continue
            if call["type"] == "tool_call" and self.valid_calls and not self.plan.parallel:
                call = invalid_tool_call(
                    name=call["name"], args=json.dumps(call["args"], ensure_ascii=False), id=call["id"],
                    error="parallel_tool_calls=False: only the first tool call is kept",
                )
            index, self.calls = self.calls, self.calls + 1
            if call["type"] == "tool_call":
                self.valid_calls += 1
                args = json.dumps(call["args"], ensure_ascii=False)
            else:
                self.errors[call["id"]] = call["error"]
                args = json.dumps(call["args"], ensure_ascii=False)  # the raw text, as a JSON string
            out.append(("", [tool_call_chunk(name=call["name"], args=args, id=call["id"], index=index)]))
        return out


# --------------------------------------------------------------------------- engine cache


class _Engines:
    """What one `ChatSafeCoDe` (and its copies on the same model) has built, and the lock that
    makes each build happen once.

    Weights come from `loading.shared_model`, shared by every chat model of the
    process that names the same weights, or from the objects `from_model`
    wrapped. An engine is a light view of those weights with one set of
    per-request settings (judge, `safecode`, `policy`): copies made with
    `model_copy` that change them get their own engine on the same weights,
    kept here (up to `MAX_VARIANTS`, least recently used first out), so
    switching between an instance and its copies never reloads anything. One
    more slot holds the engine of the most recent per-call `model=` override
    (one, so that overrides cannot pile up weights). Also held here: a
    processor loaded alone for token counting, and whether each model's
    template takes tools. A pickle carries none of it: after unpickling, the
    model is loaded again from `model` (a path or hub id) on first use, or
    found in memory if another chat model holds it.
    """

    MAX_VARIANTS = 8

    def __init__(self, hf_objects: tuple[Any, Any] | None = None) -> None:
        self.lock = threading.Lock()
        # (model, weights identity, settings identity) -> (what keeps the weights and judge alive, engine)
        self.variants: OrderedDict[tuple[Any, ...], tuple[Any, SafeCoDe]] = OrderedDict()
        self.override: tuple[tuple[Any, ...], Any, SafeCoDe] | None = None
        self.hf_objects = hf_objects
        self.processor: tuple[str, Any] | None = None  # (model, processor) loaded for counting only
        self.tool_calling: dict[str, bool] = {}  # model -> whether its chat template takes tools

    @property
    def slots(self) -> dict[tuple[Any, ...], SafeCoDe]:
        """Every engine held, by its key (for tests and introspection)."""
        held = {key: engine for key, (_, engine) in self.variants.items()}
        if self.override is not None:
            held[self.override[0]] = self.override[2]
        return held

    def get(self, override: bool, key: tuple[Any, ...], build: Callable[[], tuple[Any, SafeCoDe]]) -> SafeCoDe:
        with self.lock:
            if override:
                if self.override is None or self.override[0] != key:
                    self.override = None  # the previous override's weights may go before the next load
                    self.override = (key, *build())
                return self.override[2]
            held = self.variants.get(key)
            if held is not None:
                self.variants.move_to_end(key)
                return held[1]
            if any(k[:2] != key[:2] for k in self.variants):
                self.variants.clear()  # `model` was reassigned: the old weights are not kept alive here
            self.variants[key] = build()
            while len(self.variants) > self.MAX_VARIANTS:
                self.variants.popitem(last=False)
            return self.variants[key][1]

    def loaded(self, model: str) -> SafeCoDe | None:
        """An engine on `model`'s weights if one is built (never loads)."""
        with self.lock:
            return next((engine for key, (_, engine) in self.variants.items() if key[0] == model), None)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Engines:
        return self

    def __copy__(self) -> _Engines:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        # Loaded weights never travel in a pickle (torch modules with transformers' hooks do
        # not even pickle); the unpickled chat model loads `model` again on first use.
        return (_Engines, ())


@dataclass
class _Call:
    """One started call: the engine, its stream, how to read the answer, and the verdict to report."""

    engine: SafeCoDe
    pieces: SafeCoDeStream
    plan: CallPlan | None
    verdict: Verdict
    model_name: str
    """What `response_metadata["model_name"]` reports (`ChatSafeCoDe.model_name` or the override's name)."""
    check: Callable[[str], Verdict] | None = None
    """The answer check (`SafeCoDeConfig.check_answer`): the judge's verdict on the finished answer."""

    def answer(self) -> str:
        """The finished answer's text as the model wrote it (a forced opening included)."""
        result = self.pieces.result
        assert result is not None
        return (self.plan.prefix if self.plan is not None else "") + result.text


def special_strings(processor: Any) -> tuple[str, ...]:
    """The special-token strings the engine neutralizes in user text, read from a processor alone.

    (The same rule as `SafeCoDe`'s, for counting tokens before any weights are loaded.)
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    for attr in ("image_token", "boi_token", "eoi_token", "video_token"):
        value = getattr(processor, attr, None)
        if isinstance(value, str):
            specials.add(value)
    return tuple(sorted(specials))


def merge_turns(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive same-role turns as one turn, as the engine merges them before rendering.

    Tool results and tool-calling turns stay apart (each answers or makes its own calls).
    """
    merged: list[dict[str, Any]] = []
    for m in messages:
        plain = set(m) <= {"role", "content"}
        if merged and merged[-1]["role"] == m["role"] and m["role"] != "tool" and plain and len(merged[-1]) == 2:
            # in place, on the copy made below: linear in the turns, never a copy per turn
            merged[-1]["content"].extend([{"type": "text", "text": "\n"}, *m["content"]])
        else:
            merged.append({**m, "content": list(m["content"])} if isinstance(m.get("content"), list) else dict(m))
    return merged


def check_conversation(messages: Sequence[BaseMessage]) -> None:
    """Bound the nesting of what a conversation carries (`InputLimitError`), before any walk over it."""
    for i, message in enumerate(messages):
        if not isinstance(message.content, str):
            tools_mod.check_nesting(message.content, f"messages[{i}].content")
        for j, call in enumerate(getattr(message, "tool_calls", None) or []):
            tools_mod.check_nesting(call.get("args"), f"The arguments of messages[{i}].tool_calls[{j}] ({call.get('name')!r})")


def _refused_already(messages: Sequence[BaseMessage]) -> AIMessage | None:
    """The last message when it is an answer this model gave under an unsafe verdict."""
    last = messages[-1] if messages else None
    if isinstance(last, AIMessage) and (last.response_metadata.get("safety") or {}).get("verdict") == "unsafe":
        return last
    return None


# --------------------------------------------------------------------------- retries and the deadline


def retry_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first): 0.25 s doubling up to
    4 s, with +-25% jitter so that callers refused together do not come back together."""
    return min(4.0, 0.25 * 2**attempt) * (rng or random).uniform(0.75, 1.25)


def busy_judge(verdict: Verdict | None) -> bool:
    """Whether `verdict` is a fallback decided because every judge thread was busy (`JudgeBusyError`)."""
    return verdict is not None and verdict.source == "fallback" and (verdict.error or "").startswith("JudgeBusyError")


class _Retry:
    """One call's deadline, and its retries of what a local model fails for a moment.

    The deadline is a `RequestControl` handed to every engine call, so it
    bounds the judge, the queue, the prefill and decoding alike, and
    retries with their pauses too (a call made inside another request, e.g.
    by a judge, also ends with that request). Retried: a judge that found
    every judge thread busy (`JudgeBusyError`, raised under
    `on_judge_error="raise"` or decided as a fallback verdict) and a full
    queue (`OverloadedError`). Each retry waits `retry_delay(attempt)`; a
    wait that would end past the deadline raises `RequestTimeoutError`
    instead. The last attempt's result (a fallback verdict included) stands.
    """

    def __init__(self, max_retries: int, timeout: float | None) -> None:
        from .control import RequestControl, current_control

        self.max_retries = max_retries
        source = f"ChatSafeCoDe(timeout={timeout:g})" if timeout is not None else "timeout_s"
        self.control = RequestControl(timeout, parent=current_control(), source=source)
        self.attempt = 0

    def left(self) -> dict[str, Any]:
        """The engine's keyword arguments that put a call under this deadline."""
        return {"control": self.control}

    def _pause(self, cause: BaseException | str) -> None:
        wait = retry_delay(self.attempt)
        self.attempt += 1
        remaining = self.control.remaining()
        if remaining is not None and wait >= remaining:
            raise self.control.timeout_error(f"no time was left to retry after: {cause}") from (
                cause if isinstance(cause, BaseException) else None
            )
        self.control.wait(threading.Event(), wait)  # wakes (and raises) if the request is cancelled

    def judged(self, open_stream: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        """`open_stream()` (which judges), again while a busy judge decided its verdict."""
        while True:
            try:
                pieces = open_stream()
            except JudgeError as exc:
                if self.attempt >= self.max_retries or not isinstance(exc.__cause__, JudgeBusyError):
                    raise
                self._pause(exc.__cause__)
                continue
            if self.attempt >= self.max_retries or not busy_judge(pieces.verdict):
                return pieces
            pieces.close()  # never queued
            self._pause(str(pieces.verdict.error))

    def queued(self, pieces: SafeCoDeStream, reopen: Callable[[], SafeCoDeStream]) -> SafeCoDeStream:
        """`pieces` queued for decoding; reopened with `reopen()` and queued again while the queue is full."""
        while True:
            try:
                return pieces.start()
            except OverloadedError as exc:
                if self.attempt >= self.max_retries:
                    raise
                self._pause(exc)
                pieces = reopen()


# --------------------------------------------------------------------------- the chat model


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
    max_new_tokens: int = Field(default=256, ge=1, alias="max_tokens")
    """Most tokens in one answer (also accepted, and readable, as `max_tokens`)."""
    temperature: float | None = Field(default=None, ge=0.0)
    """Sampling temperature; 0 or None decodes greedily unless `do_sample` says otherwise."""
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    """Nucleus sampling mass (when sampling)."""
    top_k: int | None = Field(default=None, ge=0)
    """Sample from the k likeliest tokens only (when sampling); 0 turns it off."""
    do_sample: bool | None = None
    """Sample (True) or decode greedily (False); None samples exactly when `temperature` > 0."""
    seed: int | None = Field(default=None, ge=0)
    """Seeds sampling, so a sampled answer can be reproduced; None (the default) draws fresh
    randomness for every call. Greedy decoding ignores it. The image noise of the contrast
    always uses `safecode.seed`, so one request always sees the same noised view."""
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    """OpenAI's presence penalty on the answer's own tokens (-2..2); None or 0 turns it off."""
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
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

    _engines: _Engines = PrivateAttr(default_factory=_Engines)

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
        if value is not None and value not in _DTYPES:
            raise ValueError(f"`dtype` (={value!r}) must be one of {list(_DTYPES)} or None.")
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
            copy._engines = _Engines()  # another model: none of this one's engines (or wrapped objects) apply
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
            "judge": _judge_description(self.judge),
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
            # model before its first build). No native structured output:
            # `with_structured_output` uses a tool or JSON mode.
            tool_calling=bool(tool_calling_from_files(self.model)),
            structured_output=False,
        )

    def display_name(self, model: str | None = None) -> str:
        """The name answers report for `model` (a per-call override) or this chat model's own:
        `model_name` when set, else the folder's own name, the hub id or "demo" (never a local path)."""
        from .engine.loading import public_name

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
        if self._engines.hf_objects is not None:  # loaded already: fail now, not on the first call
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
        if isinstance(schema, Mapping):
            tools_mod.check_nesting(schema, "The structured-output schema")
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
        return (judge, self.safecode.model_dump_json(), self.policy.model_dump_json())

    def _engine(self, model: str | None) -> SafeCoDe:
        """The engine for `model` (None: the configured one), loading its weights on first use.

        Weights come from the process-wide registry (`loading.shared_model`), so
        every chat model naming the same weights shares one load; the engine
        adds this chat model's judge and settings, and costs no reload.
        """
        from .engine.core import SafeCoDe
        from .engine.loading import shared_model, weights_key

        override = model is not None and model != self.model
        name = str(model) if override else self.model
        hf_objects = None if override else self._engines.hf_objects
        if hf_objects is not None:
            weights: Any = ("objects", id(hf_objects[0]))
        else:
            weights = weights_key(name, device=self.device, dtype=self.dtype, **self.model_kwargs)
        judge, config, policy, shown = self.judge, self.safecode, self.policy, self.display_name(name)

        def build() -> tuple[Any, SafeCoDe]:
            if hf_objects is not None:
                held: Any = hf_objects
                hf_model, processor = hf_objects
            else:
                held = shared_model(name, device=self.device, dtype=self.dtype, **self.model_kwargs)
                hf_model, processor = held.model, held.processor
            engine = SafeCoDe(hf_model, processor, config=config, judge=judge, policy=policy, model_name=shown)
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
        from .engine.loading import load_processor, loaded_model, weights_key

        engine = self._engines.loaded(self.model)
        if engine is not None:
            return engine.processor, engine._specials
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
        from .engine.adapters import encode_views

        return int(encode_views(processor, prompt, [images] if images else [])["input_ids"].shape[1])

    # -- the LLM cache ----------------------------------------------------------------------

    def _cache_view(self, messages: Sequence[BaseMessage], kwargs: Mapping[str, Any]) -> ChatSafeCoDe:
        """This model, or a copy whose LLM cache only serves and stores answers its key describes.

        The copy skips the cache when a judge without a fingerprint decides the
        verdict, or when an image is a reference (the key would not cover its
        pixels); otherwise it filters out answers made under a fallback verdict.
        """
        if self.cache is False:
            return self
        llm_cache = self.cache if isinstance(self.cache, BaseCache) else get_llm_cache()
        if llm_cache is None:
            return self  # no cache (or LangChain's own "asked to cache, but no cache found")
        judged_here = kwargs.get("verdict") is None
        if (judged_here and judge_fingerprint(self.judge) is None) or not images_inline(messages):
            return BaseModel.model_copy(self, update={"cache": False})
        return BaseModel.model_copy(self, update={"cache": _VerdictAwareCache(llm_cache)})

    def _generate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        check_conversation(messages)  # before LangChain serialises them for the cache key
        view = self._cache_view(messages, kwargs)
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
        view = self._cache_view(messages, kwargs)
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
        }
        return options.get("model"), engine_kwargs

    def _start(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> _Call:
        """Check the call, convert the messages (before any loading), load, judge, start decoding.

        The verdict is known before the first token (`SafeCoDe.stream` judges
        first). Under an unsafe verdict a forced opening would put the refusal
        inside a tool call's JSON or a JSON answer, so such a stream is closed
        before it decodes anything and reopened under the same verdict as plain
        text: no forced prefix, no JSON instruction, and no tools when a tool
        call was forced.
        """
        check_conversation(messages)
        refused = _refused_already(messages)
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
        tools = tools_mod.format_tools(kwargs["tools"]) if kwargs.get("tools") else None
        names = tools_mod.tool_names(tools) if tools else []
        choice = tools_mod.normalize_tool_choice(kwargs.get("tool_choice"), names) if tools else "auto"
        if kwargs.get("tool_choice") not in (None, "auto", "none") and not tools:
            raise SafeCoDeInputError(
                f"`tool_choice` (={kwargs['tool_choice']!r}) was given without tools. Use llm.bind_tools(tools, tool_choice=...)."
            )
        json_mode = kwargs.get("response_format") is not None
        json_schema = _response_format_schema(kwargs["response_format"]) if json_mode else None
        # before loading (bad input is refused without loading weights): images shrink to the
        # policy's working cap here, and to what the processor needs inside the engine
        hf_messages = to_hf_messages(messages, self.policy)
        engine = self._engine(model)
        plan: CallPlan | None = None
        if tools or _uses_tools(hf_messages):
            template = tool_template(engine)  # UnsupportedModelError when the template has no tools
            if tools and choice != "none":  # "none": the tools are not offered at all
                plan = CallPlan(
                    names=tuple(names),
                    prefix=tools_mod.forced_prefix(template, choice, names),
                    parallel=kwargs.get("parallel_tool_calls") is not False,
                    parse=True,
                )
                engine_kwargs["tools"] = tools
            elif tools:
                plan = CallPlan(names=tuple(names), parse=False)
        prompt_messages = hf_messages
        if json_mode:
            # With tools offered the model may call them first, so the answer cannot be opened with "{".
            offered = plan is not None and plan.parse
            if not offered:
                plan = CallPlan(prefix="{")
            text = tools_mod.json_instruction(json_schema, with_tools=offered)
            prompt_messages = [{"role": "system", "content": [{"type": "text", "text": text}]}, *hf_messages]
        if plan is not None and plan.prefix:
            engine_kwargs["answer_prefix"] = plan.prefix
        retry = _Retry(self.max_retries, self.timeout)  # the deadline runs from here: loading is not counted
        pieces = retry.judged(lambda: engine.stream(prompt_messages, start=False, **engine_kwargs, **retry.left()))
        verdict = pieces.verdict
        assert verdict is not None  # SafeCoDe.stream decides the verdict before returning
        if verdict.label == "unsafe" and (json_mode or (plan is not None and plan.prefix)):
            pieces.close()  # never queued: nothing was decoded
            forced = plan is not None and bool(plan.prefix)
            if plan is not None and plan.names is not None:
                plan = replace(plan, prefix="")
                if forced:
                    engine_kwargs.pop("tools", None)
            else:
                plan = None
            engine_kwargs.pop("answer_prefix", None)
            prompt_messages = hf_messages
            pieces = engine.stream(hf_messages, start=False, **{**engine_kwargs, "verdict": verdict}, **retry.left())
        # A full queue refuses before anything is decoded: queue the same request again under
        # the verdict already decided (the judge does not run twice).
        reopen = lambda: engine.stream(prompt_messages, start=False, **{**engine_kwargs, "verdict": verdict}, **retry.left())  # noqa: E731
        check = None
        if engine.config.check_answer:
            tools_given = engine_kwargs.get("tools")
            check = lambda answer: engine.check_answer(prompt_messages, answer, tools=tools_given)  # noqa: E731
        return _Call(engine, retry.queued(pieces, reopen), plan, verdict, self.display_name(model), check)

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
            for chunk in _chunks(call):
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
            for chunk in _chunks(call):
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            call.pieces.close()  # an abandoned stream releases the engine here, in the thread that holds it

    async def _astart(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: Mapping[str, Any]) -> _Call:
        """`_start` on a preparation thread (images, loading, the judge block); the caller's context goes along."""
        from .control import arun_briefly

        # in a short-lived thread (see engine.run_briefly); the judge hand-off and LangChain's
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
            async for chunk in _achunks(call):
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
            async for chunk in _achunks(call):
                if run_manager:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            call.pieces.close()  # a consumer that stops early (or is cancelled) stops decoding


def init_chat_model(model: str | None = None, *, model_provider: str | None = None, **kwargs: Any) -> Any:
    """LangChain's `init_chat_model`, plus the `safecode` provider.

    LangChain 1.x keeps its providers in a fixed table inside
    `langchain.chat_models.base` (no entry points, no registration function),
    so a package outside it cannot add one: LangChain's own
    `init_chat_model(path, model_provider="safecode")` raises `ValueError`.
    Import this function in its place (one line) and `model_provider="safecode"`,
    or a `"safecode:"` prefix on `model`, builds `ChatSafeCoDe(model=..., **kwargs)`
    (LangChain's standard `temperature`, `max_tokens`, `timeout`, `max_retries`,
    `api_key` included); any other provider goes to LangChain's function unchanged
    (that needs the `langchain` package: `pip install 'safecode-guard[agents]'`).
    """
    if model is not None and model_provider is None and model.startswith(f"{PROVIDER}:"):
        model, model_provider = model.split(":", 1)[1], PROVIDER
    if model_provider is not None and model_provider.replace("-", "_").lower() == PROVIDER:
        if not model:
            raise SafeCoDeInputError("init_chat_model(model_provider='safecode') needs `model`: a local folder, a hub id or 'demo'.")
        if {"configurable_fields", "config_prefix"} & set(kwargs):
            raise SafeCoDeInputError(
                "`configurable_fields` / `config_prefix` are not supported for the safecode provider: build the "
                "model with its settings, and use llm.bind(...) or llm.model_copy(update=...) for variants."
            )
        return ChatSafeCoDe(model=model, **kwargs)
    from langchain.chat_models import (
        init_chat_model as langchain_init_chat_model,  # optional: the agents extra
    )

    return langchain_init_chat_model(model, model_provider=model_provider, **kwargs)


class _ChunkBuilder:
    """Engine text pieces as LangChain chunks: `safety` on the first, the accounting on the last.

    Text is held back only until `refusal_decision` can fill `safety["refused"]`.
    With tools bound, an `AnswerReader` turns the text into content and one
    `tool_call_chunks` chunk per finished call. On the last chunk: calls
    blocked by an unsafe verdict (`safety["blocked_tool_calls"]`) and why each
    invalid call is invalid (`response_metadata[INVALID_CALL_ERRORS]`). The
    same builder serves the sync and the async paths, so they cannot differ.
    """

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.reader = AnswerReader(call.plan, unsafe=call.verdict.label == "unsafe")
        self.pending = self.reader.feed(call.plan.prefix) if call.plan is not None else []
        self.held = ""
        self.refused: bool | None = None

    def feed(self, piece: str) -> list[ChatGenerationChunk]:
        call = self.call
        self.pending.extend(self.reader.feed(piece))
        if self.refused is None:
            self.held += piece
            self.refused = refusal_decision(self.held, call.engine.config.refusal_phrases)
            if self.refused is None:
                return []
            first = _first_chunk(self.pending, call.verdict, call.engine.config, self.refused, call.plan)
            self.pending = []
            return [first]
        out = [_chunk(text, calls) for text, calls in self.pending]
        self.pending = []
        return out

    def finish(self, answer_check: Verdict | None = None) -> list[ChatGenerationChunk]:
        call, reader = self.call, self.reader
        self.pending.extend(reader.finish())
        result = call.pieces.result
        assert result is not None
        out: list[ChatGenerationChunk] = []
        if self.refused is None:  # the answer ended before its opening decided (e.g. an empty answer)
            out.append(_first_chunk(self.pending, call.verdict, call.engine.config, result.refused, call.plan))
            self.pending = []
        out += [_chunk(text, calls) for text, calls in self.pending]
        last_meta: dict[str, Any] = {"model_name": call.model_name, "finish_reason": result.finish_reason}
        if reader.blocked:
            # merged into the first chunk's `safety` dict (LangChain merges nested dicts key by key)
            last_meta["safety"] = {"blocked_tool_calls": reader.blocked}
        if answer_check is not None:
            # the text is out already: flagged here; `invoke` replaces it (`replace_unsafe_answer`)
            last_meta.setdefault("safety", {})["answer_check"] = answer_check_metadata(answer_check, replaced=False)
        if reader.errors:
            last_meta[tools_mod.INVALID_CALL_ERRORS] = dict(reader.errors)
        out.append(
            ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    chunk_position="last",
                    response_metadata=last_meta,
                    usage_metadata=usage_metadata(result),
                )
            )
        )
        return out


def _chunks(call: _Call) -> Iterator[ChatGenerationChunk]:
    builder = _ChunkBuilder(call)
    for piece in call.pieces:
        yield from builder.feed(piece)
    check = None
    if call.check is not None:
        from .control import run_briefly

        check = run_briefly(lambda: call.check(call.answer()))  # type: ignore[misc]
    yield from builder.finish(check)


async def _achunks(call: _Call) -> AsyncIterator[ChatGenerationChunk]:
    builder = _ChunkBuilder(call)
    async for piece in call.pieces:
        for chunk in builder.feed(piece):
            yield chunk
    check = None
    if call.check is not None:
        from .control import arun_briefly

        check = await arun_briefly(lambda: call.check(call.answer()))  # type: ignore[misc]
    for chunk in builder.finish(check):
        yield chunk


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


