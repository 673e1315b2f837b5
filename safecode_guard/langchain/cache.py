"""LangChain's LLM cache and SafeCoDe: what keys an answer (judge fingerprint, inline images) and what is never stored."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.caches import BaseCache
from langchain_core.globals import get_llm_cache
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from pydantic import BaseModel

from ..judges import ChatModelJudge, FixedJudge, SelfJudge

if TYPE_CHECKING:
    pass

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


def judge_description(judge: Any) -> str:
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


class VerdictAwareCache(BaseCache):
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


def cache_view(chat: Any, messages: Sequence[BaseMessage], kwargs: Mapping[str, Any]) -> Any:
    """`chat` (a `ChatSafeCoDe`), or a copy whose LLM cache only serves and stores answers its key describes.

    The copy skips the cache when a judge without a fingerprint decides the
    verdict (`kwargs` has no handed-over `verdict`), or when an image is a
    reference (the key would not cover its pixels); otherwise it filters out
    answers made under a fallback verdict.
    """
    if chat.cache is False:
        return chat
    llm_cache = chat.cache if isinstance(chat.cache, BaseCache) else get_llm_cache()
    if llm_cache is None:
        return chat  # no cache (or LangChain's own "asked to cache, but no cache found")
    judged_here = kwargs.get("verdict") is None
    if (judged_here and judge_fingerprint(chat.judge) is None) or not images_inline(messages):
        return BaseModel.model_copy(chat, update={"cache": False})
    return BaseModel.model_copy(chat, update={"cache": VerdictAwareCache(llm_cache)})
