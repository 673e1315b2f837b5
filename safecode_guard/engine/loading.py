"""Where a model comes from, checked before transformers is asked to load it.

`SafeCoDe.from_pretrained(path_or_id)` hands any string to transformers,
which takes whatever is not an existing folder for a Hugging Face hub id.
That made three mistakes slow or confusing: a mistyped folder
(`models/lava`) went to the hub and waited through every retry (about
140 s offline), a missing absolute path got the hub's "Repo id must be in
the form ..." complaint, and a text-only checkpoint printed transformers'
list of every config class it knows.

`check_model_source` decides first, from the string and the disk alone,
whether it names a local folder or a hub id, and checks that:

- `demo` (`DEMO_MODEL`) is the embedded demo model (`demo_model`), built into
  its cache folder on first use, wherever a model is named (a local folder
  called `demo` is `./demo`);

- a local folder exists, holds a `config.json`, and that config describes an
  image-text-to-text model (a text-only checkpoint gets one sentence);
- a hub id is in the local cache when `HF_HUB_OFFLINE` (or
  `TRANSFORMERS_OFFLINE`) is set; otherwise one request to the hub, without
  retries, tells whether it exists and is reachable. If the hub cannot be
  reached the cached copy is used, and without one the error comes at once.

`load_pretrained` then loads model and processor from the checked source
(from the cache only when the hub is off or unreachable), and turns
transformers' errors into one clear sentence.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..control import run_briefly
from ..errors import HubUnreachableError, ModelNotFoundError, UnsupportedModelError, did_you_mean
from . import demo_model

__all__ = [
    "AUTO_CLASSES",
    "DEFAULT_AUTO_CLASS",
    "DEMO_MODEL",
    "HUB_PROBE_TIMEOUT_S",
    "HubUnreachableError",
    "LoadedModel",
    "ModelNotFoundError",
    "ModelSource",
    "WeightsKey",
    "chat_template_source",
    "check_model_source",
    "hub_offline",
    "load_pretrained",
    "load_processor",
    "loaded_model",
    "looks_local",
    "public_name",
    "shared_model",
    "weights_key",
]

log = logging.getLogger(__name__)

DEMO_MODEL = "demo"
"""The name of the embedded demo model, accepted wherever a model is named."""

HUB_PROBE_TIMEOUT_S = 10.0
"""Seconds the one request that checks a hub id may take (connecting and reading)."""


@dataclass(frozen=True)
class ModelSource:
    """Where `load_pretrained` loads a model from, as `check_model_source` found it."""

    kind: Literal["folder", "hub"]
    location: str
    """The folder (user home expanded) or the hub id."""
    cached_only: bool = False
    """Load from the local hub cache only (offline mode, or the hub could not be reached)."""


# --------------------------------------------------------------------------- local or hub?

def public_name(path_or_id: str) -> str:
    """A model's name fit to show others: the hub id, a local folder's own name (never its path), `demo`."""
    text = path_or_id.strip()
    if text == DEMO_MODEL:
        return text
    if looks_local(text):
        return Path(text.rstrip("/\\")).name or text
    return text


def looks_local(path_or_id: str) -> bool:
    """Whether `path_or_id` names a local folder rather than a hub id, from its spelling and the disk.

    Local: anything that exists; absolute or home-relative paths; `./`, `../`
    or backslashes; more than one `/`; anything a hub id cannot be (hub ids
    are `name` or `namespace/name`, with no `--` or `..`); and `a/b` when
    `a` is an existing local folder (so `models/lava` next to a `models/`
    folder is a missing folder, not a hub id).
    """
    text = path_or_id.strip()
    if Path(text).expanduser().exists():
        return True
    if text.startswith(("/", "~", "./", "../", ".\\", "..\\")) or text in (".", ".."):
        return True
    if "\\" in text or re.match(r"^[A-Za-z]:", text) or text.count("/") > 1:
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).is_dir()


def hub_offline() -> bool:
    """Whether the hub is off limits: `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to a true value.

    Read from the environment on every call (huggingface_hub reads it once, at import).
    """
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        pass
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# --------------------------------------------------------------------------- local folders

_PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
)


def _missing_folder_error(text: str, path: Path) -> ModelNotFoundError:
    """`folder not found`, naming the nearest existing parent's closest entry when there is one."""
    hint = ""
    parent = path.parent
    if parent.is_dir():
        siblings = [p.name for p in parent.iterdir() if p.is_dir()]
        close = did_you_mean(path.name, siblings)
        if close:
            hint = f" Did you mean {str(Path(text).parent / close)!r}?"
    return ModelNotFoundError(
        f"Model folder not found: {text!r} does not exist.{hint} Give the folder that holds the "
        "model's config.json (saved with save_pretrained), or a Hugging Face hub id like "
        "'llava-hf/llava-1.5-7b-hf'."
    )


def _image_text_to_text_types() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return frozenset(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def check_model_config(config: dict[str, Any], where: str) -> None:
    """Raise `UnsupportedModelError` unless the `config.json` content describes an image-text-to-text model.

    A model with custom code (`auto_map` naming `AutoModelForImageTextToText`)
    passes; its own code decides later.
    """
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and "AutoModelForImageTextToText" in auto_map:
        return
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _image_text_to_text_types():
        return
    architectures = config.get("architectures") or ["?"]
    if "vision_config" in config:
        kind = f"a model of type {model_type!r}, which transformers cannot load as image-text-to-text"
    else:
        kind = f"a text-only model ({architectures[0]}, model_type {model_type!r})"
    raise UnsupportedModelError(
        f"{where} holds {kind}; SafeCoDe needs a vision-language (image-text-to-text) model such as "
        "LLaVA, Qwen2-VL, Gemma 3 or SmolVLM."
    )


def _check_folder(text: str, path: Path) -> None:
    if not path.exists():
        raise _missing_folder_error(text, path)
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{text!r} is a file, not a model folder. Give the folder that holds config.json and the "
            "weights (for a single GGUF file, convert it to a saved transformers model first)."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(
            f"{text!r} holds no config.json, so it is not a saved model. Give the folder written by "
            "save_pretrained (config.json, the weights and the processor files)."
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModelError(
            f"The config.json in {text!r} cannot be read ({type(exc).__name__}: {exc}). "
            "Save the model again with save_pretrained."
        ) from exc
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"The config.json in {text!r} is not a JSON object. Save the model again.")
    check_model_config(config, repr(text))
    if not any((path / name).is_file() for name in _PROCESSOR_FILES):
        raise UnsupportedModelError(
            f"{text!r} holds a model but no processor (none of {', '.join(_PROCESSOR_FILES)}). "
            "Save the processor into the same folder: processor.save_pretrained(folder)."
        )


# --------------------------------------------------------------------------- hub ids


def _cached_config(repo_id: str) -> str | None:
    """The cached `config.json` of `repo_id`, or None when the cache does not hold it."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return found if isinstance(found, str) else None


def _check_cached_config(repo_id: str, config_file: str) -> None:
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # transformers reports an unreadable cache entry itself
    if isinstance(config, dict):
        check_model_config(config, repr(repo_id))


def _probe_hub(repo_id: str) -> str | None:
    """One request to the hub about `repo_id`, without retries: None if it is there, else why not.

    Raises `ModelNotFoundError` when the hub answers that there is no such
    (accessible) model; returns the reason text when the hub cannot be reached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"{repo_id!r} is a gated model on the Hugging Face hub: accept its terms on the hub and "
            "log in (`hf auth login`), or give a local folder."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"No model {repo_id!r} on the Hugging Face hub (or it is private: log in with "
            "`hf auth login`). If you meant a local folder, give its path (e.g. './models/...')."
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return f"the hub answered HTTP {status}"
    except Exception as exc:  # connection refused, DNS failure, timeout, blocked socket, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_hub_id(repo_id: str) -> ModelSource:
    cached = _cached_config(repo_id)
    if hub_offline():
        if cached is None:
            raise ModelNotFoundError(
                f"{repo_id!r} is not a local folder, and it is not in the local Hugging Face cache; "
                "HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids downloading it. Give the path of a "
                f"local model folder, or download it first where there is a network (`hf download {repo_id}`)."
            )
        _check_cached_config(repo_id, cached)
        return ModelSource("hub", repo_id, cached_only=True)
    unreachable = _probe_hub(repo_id)
    if unreachable is None:
        return ModelSource("hub", repo_id)
    if cached is not None:
        log.warning("The Hugging Face hub is unreachable (%s); loading %r from the local cache.", unreachable, repo_id)
        _check_cached_config(repo_id, cached)
        return ModelSource("hub", repo_id, cached_only=True)
    raise HubUnreachableError(
        f"{repo_id!r} is not a local folder, and the Hugging Face hub cannot be reached to download it "
        f"({unreachable}); it is not in the local cache either. Give the path of a local model folder "
        "(a typo in a folder name also lands here), or download the model where there is a network. "
        "Set HF_HUB_OFFLINE=1 to never try the hub."
    )


# --------------------------------------------------------------------------- public


def check_model_source(path_or_id: str | os.PathLike[str]) -> ModelSource:
    """Check that `path_or_id` names a loadable image-text-to-text model, without loading it.

    `demo` is the embedded demo model's folder (built on first use: the one
    case that writes to disk). Local folders are checked on disk (exists,
    holds config.json of a vision-language model, has processor files); hub
    ids against the cache (offline) or with one request to the hub. Errors:
    `DemoModelUnavailableError` (the demo cannot be built here), `ModelNotFoundError`
    (no such folder or model; `HubUnreachableError` when the hub is down and
    nothing is cached) and `UnsupportedModelError` (not a vision-language
    model), each naming the fix.
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise ModelNotFoundError(
            f"The model must be a folder path or a hub id string, got a {type(path_or_id).__name__}."
        )
    text = os.fspath(path_or_id).strip()
    if not text:
        raise ModelNotFoundError("The model is empty. Give a local model folder or a hub id.")
    if text == DEMO_MODEL:
        return ModelSource("folder", str(demo_model.ensure_demo_model()))
    if looks_local(text):
        path = Path(text).expanduser()
        _check_folder(text, path)
        return ModelSource("folder", str(path))
    return _check_hub_id(text)


def _first_line(exc: BaseException) -> str:
    """An exception's message up to its first line break, without a trailing period."""
    return str(exc).strip().splitlines()[0].rstrip(". ") if str(exc).strip() else type(exc).__name__


DEFAULT_AUTO_CLASS = "AutoModelForImageTextToText"
"""The transformers Auto class a model is loaded with unless told otherwise."""

#: Auto classes `load_pretrained` may be asked for: a ShieldGemma 2 guard is an image classifier
#: whose generation model sits inside it (`AutoModelForImageTextToText` would leave its weights out).
AUTO_CLASSES = (DEFAULT_AUTO_CLASS, "AutoModelForImageClassification")


def load_pretrained(
    path_or_id: str | os.PathLike[str], *, auto_class: str = DEFAULT_AUTO_CLASS, **model_kwargs: Any
) -> tuple[Any, Any]:
    """`(model, processor)` for `path_or_id`, loaded with `AutoModelForImageTextToText` + `AutoProcessor`.

    Checked first with `check_model_source`; `model_kwargs` go to the model's
    `from_pretrained` (e.g. `dtype`, `device_map`, `attn_implementation`).
    `auto_class` names another Auto class of `AUTO_CLASSES` to load the model with.
    """
    import transformers
    from transformers import AutoProcessor

    if auto_class not in AUTO_CLASSES:
        raise ValueError(f"`auto_class` (={auto_class!r}) must be one of {AUTO_CLASSES}.")
    source = check_model_source(path_or_id)
    cache_only = {"local_files_only": True} if source.cached_only else {}
    try:
        processor = AutoProcessor.from_pretrained(source.location, **cache_only)
        model = getattr(transformers, auto_class).from_pretrained(source.location, **cache_only, **model_kwargs)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(
            f"Could not load {os.fspath(path_or_id)!r} as an image-text-to-text model: {_first_line(exc)}. "
            "Check that the folder (or hub snapshot) holds complete weights and processor files saved "
            "with save_pretrained by a transformers version that supports this model."
        ) from exc
    return model, processor


def load_processor(path_or_id: str | os.PathLike[str]) -> Any:
    """The processor of `path_or_id` alone (no weights), checked and located as `load_pretrained` does."""
    from transformers import AutoProcessor

    source = check_model_source(path_or_id)
    cache_only = {"local_files_only": True} if source.cached_only else {}
    try:
        return AutoProcessor.from_pretrained(source.location, **cache_only)
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(
            f"Could not load the processor of {os.fspath(path_or_id)!r}: {_first_line(exc)}. Give a local "
            "folder saved with save_pretrained (or a hub id reachable from here)."
        ) from exc


# --------------------------------------------------------------------------- the chat template, unloaded

_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")


def _template_in(name: str, text: str) -> str | list[Any] | None:
    if name.endswith(".jinja"):
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return None
    template = data.get("chat_template") if isinstance(data, dict) else None
    return template if isinstance(template, (str, list)) else None


def chat_template_source(path_or_id: str) -> str | list[Any] | None:
    """The chat template `path_or_id` would load with, read from its files; None when not found here.

    Reads only what is already on disk: a local folder, the demo model's folder
    once built, or a hub model's files in the local cache (never the network).
    A list is a tokenizer's named templates (`[{"name": ..., "template": ...}]`).
    """
    text = path_or_id.strip()

    def read(name: str) -> str | None:
        if text == DEMO_MODEL:
            file = demo_model.demo_model_dir() / name if demo_model.is_demo_model_ready() else None
        elif looks_local(text):
            file = Path(text).expanduser() / name
        else:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(text, name)
            file = Path(found) if isinstance(found, str) else None
        try:
            return file.read_text(encoding="utf-8") if file is not None and file.is_file() else None
        except (OSError, UnicodeDecodeError):
            return None

    for name in _TEMPLATE_FILES:
        content = read(name)
        template = _template_in(name, content) if content is not None else None
        if template:
            return template
    return None


# --------------------------------------------------------------------------- loaded once per process
#
# Every `ChatSafeCoDe` of a process that names the same weights (the same folder or hub id,
# loaded with the same options) shares one loaded model: copies that change the judge or
# the SafeCoDe settings, two NeMo model entries on one folder, an application's several
# chat models. The registry holds them weakly: the weights are freed once nothing uses
# them (the last engine on them is gone), and the next use loads them again.


@dataclass(frozen=True)
class WeightsKey:
    """What makes two loads the same weights: where they come from and how they are loaded."""

    location: str
    """A local folder as its resolved absolute path, a hub id as given, the demo model's folder."""
    device: str | None = None
    dtype: str | None = None
    options: str = ""
    """The other `from_pretrained` keyword arguments, as a stable string."""
    auto_class: str = DEFAULT_AUTO_CLASS
    """The transformers Auto class the model is loaded with."""


class LoadedModel:
    """A model and its processor, loaded once per process for one `WeightsKey`.

    The registry keeps it only while someone holds it: keep a reference for as
    long as you use `model` and `processor`.
    """

    __slots__ = ("__weakref__", "key", "model", "processor")

    def __init__(self, key: WeightsKey, model: Any, processor: Any) -> None:
        self.key, self.model, self.processor = key, model, processor


_LOADED: weakref.WeakValueDictionary[WeightsKey, LoadedModel] = weakref.WeakValueDictionary()
_LOADING: dict[WeightsKey, concurrent.futures.Future[LoadedModel]] = {}
_REGISTRY_LOCK = threading.Lock()


def weights_key(
    path_or_id: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: Any = None,
    auto_class: str = DEFAULT_AUTO_CLASS,
    **model_kwargs: Any,
) -> WeightsKey:
    """The identity of the weights `shared_model` would load (nothing is checked or loaded)."""
    text = os.fspath(path_or_id).strip()
    if text == DEMO_MODEL:
        location = str(demo_model.demo_model_dir().resolve())
    elif looks_local(text):
        location = str(Path(text).expanduser().resolve())
    else:
        location = text
    dtype_name = None if dtype is None else str(dtype).removeprefix("torch.")
    options = repr(sorted((str(k), repr(v)) for k, v in model_kwargs.items()))
    return WeightsKey(location, None if device is None else str(device), dtype_name, options, auto_class)


def loaded_model(key: WeightsKey) -> LoadedModel | None:
    """The weights for `key` if some user in this process holds them loaded (never loads)."""
    with _REGISTRY_LOCK:
        return _LOADED.get(key)


def shared_model(
    path_or_id: str | os.PathLike[str],
    *,
    device: str | None = None,
    dtype: Any = None,
    auto_class: str = DEFAULT_AUTO_CLASS,
    **model_kwargs: Any,
) -> LoadedModel:
    """The model and processor of `path_or_id`, loaded once per process for these options.

    Same arguments as `SafeCoDe.from_pretrained`'s loading part (`device`
    moves the model after loading; `dtype` is a name like "bfloat16" or a
    torch dtype). Calls that name the same weights (`weights_key`) get the
    same `LoadedModel` while anyone holds it; concurrent first calls load
    once (the others wait for that load and get its result or its error).
    `auto_class`: see `load_pretrained`.
    """
    key = weights_key(path_or_id, device=device, dtype=dtype, auto_class=auto_class, **model_kwargs)
    with _REGISTRY_LOCK:
        held = _LOADED.get(key)
        if held is not None:
            return held
        pending = _LOADING.get(key)
        loading_here = pending is None
        if pending is None:
            pending = _LOADING[key] = concurrent.futures.Future()
    if not loading_here:
        return pending.result()  # another thread is loading these weights: its result, or its error
    try:
        loaded = LoadedModel(key, *_load(path_or_id, device, dtype, {**model_kwargs, "auto_class": auto_class}))
    except BaseException as exc:
        with _REGISTRY_LOCK:
            del _LOADING[key]
        pending.set_exception(exc)
        raise
    with _REGISTRY_LOCK:
        _LOADED[key] = loaded
        del _LOADING[key]
    pending.set_result(loaded)
    return loaded


def _load(path_or_id: str | os.PathLike[str], device: Any, dtype: Any, model_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    import torch  # torch loads with the first model: importing this module stays cheap

    if dtype is not None:
        model_kwargs = {**model_kwargs, "dtype": getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype}
    # torch work in a thread of its own, so the caller's thread never joins OpenMP (see run_briefly)
    model, processor = run_briefly(lambda: load_pretrained(path_or_id, **model_kwargs))
    if device is not None:
        model = run_briefly(lambda: model.to(device))
    return model, processor
