"""safecode-guard: safety-aware contrastive decoding (SafeCoDe) for local vision-language models.

    from safecode_guard import SafeCoDe, SafeCoDeConfig, Verdict, FixedJudge, ChatSafeCoDe

`SafeCoDe` steers a loaded Hugging Face image-text-to-text model at decoding
time; `ChatSafeCoDe` is the same as a LangChain chat model whose answers carry
the safety verdict in `response_metadata["safety"]`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_REFUSAL_PHRASES, BatchingConfig, InputPolicy, SafeCoDeConfig
from .control import RequestControl
from .errors import (
    ImageInputError,
    InputLimitError,
    InvalidVerdictError,
    JudgeBusyError,
    JudgeError,
    OverloadedError,
    RequestCancelledError,
    RequestTimeoutError,
    SafeCoDeError,
    SafeCoDeInputError,
    UnsupportedContentError,
    UnsupportedModelError,
)
from .verdict import Verdict

if TYPE_CHECKING:
    from .engine.core import SafeCoDe
    from .engine.results import SafeCoDeResult, SafeCoDeStream, Usage
    from .judges import (
        CallableJudge,
        ChatModelJudge,
        FixedJudge,
        Judge,
        JudgeRequest,
        SelfJudge,
        make_judge,
    )
    from .judges.guard import GuardJudge
    from .langchain.chat_model import ChatSafeCoDe

__version__ = "0.1.0"

# Heavy modules (torch, transformers, langchain) load on first use, so that
# `import safecode_guard` stays cheap for configs, CLIs and NeMo config folders.
_LAZY = {
    "SafeCoDe": "engine.core",
    "SafeCoDeResult": "engine.results",
    "SafeCoDeStream": "engine.results",
    "Usage": "engine.results",
    "Judge": "judges",
    "JudgeRequest": "judges",
    "FixedJudge": "judges",
    "CallableJudge": "judges",
    "SelfJudge": "judges",
    "ChatModelJudge": "judges",
    "GuardJudge": "judges",
    "make_judge": "judges",
    "ChatSafeCoDe": "langchain.chat_model",
}

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "BatchingConfig",
    "CallableJudge",
    "ChatModelJudge",
    "ChatSafeCoDe",
    "FixedJudge",
    "GuardJudge",
    "ImageInputError",
    "InputLimitError",
    "InputPolicy",
    "InvalidVerdictError",
    "Judge",
    "JudgeBusyError",
    "JudgeError",
    "JudgeRequest",
    "OverloadedError",
    "RequestCancelledError",
    "RequestControl",
    "RequestTimeoutError",
    "SafeCoDe",
    "SafeCoDeConfig",
    "SafeCoDeError",
    "SafeCoDeInputError",
    "SafeCoDeResult",
    "SafeCoDeStream",
    "SelfJudge",
    "UnsupportedContentError",
    "UnsupportedModelError",
    "Usage",
    "Verdict",
    "__version__",
    "make_judge",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safecode_guard' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
