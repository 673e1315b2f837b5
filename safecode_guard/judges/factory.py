"""`make_judge`: a judge from a spec string or an object."""

from __future__ import annotations

from typing import Any

from ..errors import SafeCoDeInputError
from .builtin import CallableJudge, FixedJudge
from .chat import ChatModelJudge, chat_judge, is_chat_model
from .guard import judge_from_spec as guard_from_spec
from .request import Judge
from .self_judge import SelfJudge

__all__ = [
    "make_judge",
]


# --------------------------------------------------------------------------- make_judge

_SPEC_FORMS = (
    "'self' (= 'self:direct'), 'self:direct', 'self:caption', 'fixed:safe', 'fixed:unsafe', "
    "'chat:<provider>:<model>' (e.g. 'chat:openai:gpt-4o'), "
    "'guard:<local folder or hub id>' (Llama Guard 3 Vision, Llama Guard 4 or ShieldGemma 2, "
    "e.g. 'guard:meta-llama/Llama-Guard-4-12B')"
)
_ACCEPTED = (
    f"a spec string ({_SPEC_FORMS}), a judge object (with `name` and `__call__`), a LangChain "
    "BaseChatModel, or a callable taking a JudgeRequest"
)


def make_judge(spec_or_object: Any) -> Judge:
    """A judge from a spec string or an object.

    Strings: "self" / "self:direct", "self:caption", "fixed:safe",
    "fixed:unsafe", "chat:<provider>:<model>" (LangChain's `init_chat_model`,
    needs `pip install safecode-guard[agents]` plus the provider's package),
    "guard:<local folder or hub id>" (a `GuardJudge`: Llama Guard 3 Vision,
    Llama Guard 4 or ShieldGemma 2; options after "?", e.g.
    "guard:meta-llama/Llama-Guard-4-12B?device=cuda:1&categories=S1,S9";
    loaded on first use).
    Objects: an object whose class has `as_safecode_judge()` gives the judge
    that method returns (a `ChatSafeCoDe` gives a `ChatSafeCoDeJudge`: its
    model's own self judge, unsteered, loaded on first use); any other
    LangChain `BaseChatModel` becomes a `ChatModelJudge`; a judge is returned
    as is; any other callable becomes a `CallableJudge`. None means the
    default, "self". `SelfJudge`s come back unbound; the engine binds them.
    """
    obj = spec_or_object
    if obj is None:
        return SelfJudge("direct")
    if isinstance(obj, str):
        return _judge_from_spec(obj)
    hook = getattr(type(obj), "as_safecode_judge", None)
    if callable(hook):
        # a chat model that steers its own answers (`ChatSafeCoDe`) says how it judges instead
        return obj.as_safecode_judge()
    if is_chat_model(obj):
        return ChatModelJudge(obj)
    if isinstance(obj, Judge) and isinstance(obj.name, str) and obj.name:
        return obj
    if callable(obj):
        return CallableJudge(obj)
    raise SafeCoDeInputError(
        f"Cannot make a judge from a {type(obj).__name__} ({obj!r:.80}). Use {_ACCEPTED}."
    )


def _judge_from_spec(spec: str) -> Judge:
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "self" and rest.lower() in ("", "direct", "caption"):
        return SelfJudge(rest.lower() or "direct")  # type: ignore[arg-type]
    if kind == "fixed" and rest.lower() in ("safe", "unsafe"):
        return FixedJudge(rest.lower())  # type: ignore[arg-type]
    if kind == "guard":
        return guard_from_spec(rest, text)
    if kind == "chat":
        provider, _, model = rest.partition(":")  # the model name may hold colons (ollama tags)
        if provider.strip() and model.strip():
            return chat_judge(provider.strip(), model.strip(), text)
    raise SafeCoDeInputError(f"Unknown judge spec {spec!r}. Valid forms: {_SPEC_FORMS}.")
