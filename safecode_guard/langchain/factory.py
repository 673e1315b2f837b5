"""`init_chat_model`: LangChain's model factory, plus the `safecode` provider."""

from __future__ import annotations

from typing import Any

from ..errors import SafeCoDeInputError
from .chat_model import ChatSafeCoDe
from .settings import PROVIDER

__all__ = ["init_chat_model"]


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
    # optional: the `langchain` package comes with the agents extra
    from langchain.chat_models import init_chat_model as langchain_init_chat_model

    return langchain_init_chat_model(model, model_provider=model_provider, **kwargs)

