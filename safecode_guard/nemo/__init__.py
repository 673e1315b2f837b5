"""NeMo Guardrails integration: the `safecode` engine and the SafeCoDe input-rail actions.

Needs the optional extra: `pip install 'safecode-guard[nemo]'` (NeMo Guardrails 0.24).

A NeMo config folder uses this module from its `config.py`::

    from safecode_guard.nemo import init  # NeMo calls init(app) while building LLMRails

`init(app)` checks the config and registers:

- the **`safecode` engine**: `engine: safecode` in `config.yml` builds a
  `ChatSafeCoDe` from `model:` and `parameters:` and wraps it in
  `SafeCoDeLLMAdapter`, NeMo's `LangChainLLMAdapter` with the limits a
  request-facing model needs (below). `model` and string parameters may name
  environment variables as `${NAME}` or `${NAME:-default}`, expanded once,
  when the config loads; the model `demo` is the embedded demo model.
  Parameter names and the model source are checked then too, so a typo or
  a missing model folder fails while `LLMRails` is built, not on a request.
- the **rail actions** `safecode_check_input` (the `Verdict` as a dict, for
  Colang 1.0 flows) and `safecode_check_input_outcome` (a `RailOutcome`, for
  Colang 2.x flows, parallel rails and anything else that wants NeMo's own
  verdict type);
- `safecode_generate`, which answers with the main model for Colang 2.x
  flows, images included, steered by the rail's verdict; `safecode_stream_said`
  sends what the bot says to a streaming request after the output rails
  passed it (Colang 2.x's `bot say` does not stream by itself), and
  `safecode_stream_text` streams a fixed text;
- the prompt filter `safecode_text` (text parts of a message, images as
  `[image]`) for NeMo's own check prompts, whose `{{ user_input }}` would
  otherwise paste the base64 of each image into the prompt.

What a request may change (NeMo copies request data into model calls:
`options.llm_params`, and in its server the OpenAI fields and `model`):
sampling options, token limits, `stop` and tools, nothing else. A per-call
`verdict` (which would switch the steering off) or `model` (another folder
to load) in request data is refused with `RequestOptionError` (HTTP 400
from NeMo's server). A request's `model` must be the configured model's
served name (`served_model_name`), else `ClientModelError` (HTTP 400); it is
never expanded, probed or loaded. Calls NeMo makes for its own checks
(`self check input` and other `*check*` tasks) get plain decoding within the
config's `max_new_tokens`: their prompts are not judged or steered.

Input flow of the actions: the current user turn (`$user_message`: a string,
or OpenAI-style blocks with `image_url` data URLs when images are sent) plus
the earlier turns of the request NeMo is answering -> LangChain messages ->
`langchain.messages.to_hf_messages` (images decoded under the model's `InputPolicy`,
so http(s) URLs are not fetched unless it allows them) -> `JudgeRequest` ->
`run_judge`. This is the conversion `ChatSafeCoDe` itself applies, so the rail
judges what the model will see.

Output flow: a `Verdict`. The action only decides; the Colang flow renders the
consequence (a refusal and `stop`). A request whose content cannot be read
(corrupt image, unsupported block) gives a fail-closed verdict
(`label="unsafe"`, `source="fallback"`, the error text kept): the model could
not answer it either.

Which model the rail judges with: the `models:` entry of the type the rail
names (`safecode check input $model=<type>` in Colang 1.0, `model="<type>"`
as an action argument), else the entry of type `safecode_rail`, else the main
model when it is a `ChatSafeCoDe` (its engine is shared: no second copy in
memory). These entries are `engine: safecode` models; their settings
(threshold, `on_judge_error`, image policy) and their own judge apply. A rail
with none of them and a judge that needs a model (`self`) fails when
`LLMRails` is built: it never falls back to another model. Which judge: the
action's `judge` argument, else `$SAFECODE_JUDGE`, else the rail model's own
judge, else `self`. Judges are cached per model and judge spec.

Nothing is loaded at import time: models load on the first request.
"""

from __future__ import annotations

# Fail early, naming the fix, when the optional extra is missing (the modules below need these).
try:
    from nemoguardrails.actions import action  # noqa: F401
    from nemoguardrails.actions.rail_outcome import RailOutcome  # noqa: F401
    from nemoguardrails.integrations.langchain.llm_adapter import LangChainLLMAdapter  # noqa: F401
    from nemoguardrails.llm.models.initializer import ModelInitializationError  # noqa: F401
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        "safecode_guard.nemo needs NeMo Guardrails 0.24, which is not installed. "
        "Install it with `pip install 'safecode-guard[nemo]'`."
    ) from exc

from ..errors import NemoConfigError, RequestOptionError, RequestShapeError
from .actions import (
    init,
    safecode_check_input,
    safecode_check_input_outcome,
    safecode_generate,
    safecode_stream_said,
    safecode_stream_text,
    text_of,
)
from .adapter import SafeCoDeLLMAdapter, is_check_task
from .config_checks import check_config
from .judging import check_input, rail_model, request_messages
from .provider import chat_model_from_config, clear_caches, provider, register_provider
from .settings import (
    DEFAULT_JUDGE,
    DEMO_MODEL,
    ENGINE_NAME,
    JUDGE_ENV,
    MODEL_ENV,
    RAIL_MODEL_TYPE,
    REQUEST_OPTIONS,
    ClientModelError,
    ConfiguredModelError,
    check_parameters,
    check_request_options,
    expand_env,
    resolve_judge,
    resolve_model,
    served_model_name,
)

__all__ = [
    "DEFAULT_JUDGE",
    "DEMO_MODEL",
    "ENGINE_NAME",
    "JUDGE_ENV",
    "MODEL_ENV",
    "RAIL_MODEL_TYPE",
    "REQUEST_OPTIONS",
    "ClientModelError",
    "ConfiguredModelError",
    "NemoConfigError",
    "RequestOptionError",
    "RequestShapeError",
    "SafeCoDeLLMAdapter",
    "chat_model_from_config",
    "check_config",
    "check_input",
    "check_parameters",
    "check_request_options",
    "clear_caches",
    "expand_env",
    "init",
    "is_check_task",
    "provider",
    "rail_model",
    "register_provider",
    "request_messages",
    "resolve_judge",
    "resolve_model",
    "safecode_check_input",
    "safecode_check_input_outcome",
    "safecode_generate",
    "safecode_stream_said",
    "safecode_stream_text",
    "served_model_name",
    "text_of",
]
