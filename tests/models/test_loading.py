"""Model sources are checked before transformers sees them: fast, clear errors for the common mistakes.

Each test counts network attempts instead of timing anything: a failure that
"waits through every retry" shows up as more than one attempt.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safecode_guard.engine import SafeCoDe, loading
from safecode_guard.engine.loading import (
    HubUnreachableError,
    ModelNotFoundError,
    check_model_source,
    load_pretrained,
    looks_local,
)
from safecode_guard.errors import UnsupportedModelError


@pytest.fixture(autouse=True)
def lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every DNS lookup or connection attempt, each refused as a machine without network would."""
    attempts: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(str(args[:1]))
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield attempts


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub access allowed (HF_HUB_OFFLINE unset), on a machine where every lookup fails."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[str, Path], None]:
    """`put(repo_id, folder)`: a local Hugging Face cache holding `folder` as the snapshot of `repo_id`."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def put(repo_id: str, folder: Path) -> None:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        revision = "0" * 40
        shutil.copytree(folder, repo / "snapshots" / revision)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)

    return put


def text_only_model(folder: Path) -> Path:
    """A tiny saved Llama language model with its tokenizer: no vision tower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safecode_guard.testing import make_tokenizer

    tok = make_tokenizer([])
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- local or hub


@pytest.mark.parametrize(
    "text",
    ["/models/llava", "~/llava", "./llava", "../llava", "a/b/c", "C:\\models\\llava", "bad--name/x", "x/"],
)
def test_paths_that_cannot_be_hub_ids_are_local(text: str) -> None:
    assert looks_local(text)


def test_hub_ids_are_not_local_unless_their_first_part_is_a_folder_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert not looks_local("llava-hf/llava-1.5-7b-hf")
    assert not looks_local("models/lava")
    (tmp_path / "models").mkdir()
    assert looks_local("models/lava")  # ./models exists: a missing folder, not a hub id


# --------------------------------------------------------------------------- local folders


def test_mistyped_folder_fails_at_once_as_folder_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lookups: list[str], online: None
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llava").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="folder not found") as info:
        SafeCoDe.from_pretrained("models/lava")
    assert "Did you mean 'models/llava'?" in str(info.value)
    assert lookups == []  # decided on disk: the hub was never asked


def test_missing_absolute_path_says_folder_not_found(tmp_path: Path, lookups: list[str], online: None) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        check_model_source(tmp_path / "nowhere" / "llava")
    message = str(info.value)
    assert "folder not found" in message and "Repo id" not in message and ".." not in message
    assert lookups == []


def test_text_only_checkpoint_gets_one_clear_sentence(tmp_path: Path) -> None:
    folder = text_only_model(tmp_path / "smollm")
    with pytest.raises(UnsupportedModelError) as info:
        SafeCoDe.from_pretrained(str(folder))
    message = str(info.value)
    assert "text-only model (LlamaForCausalLM, model_type 'llama')" in message
    assert "vision-language" in message
    assert "\n" not in message and "Config" not in message  # no list of config classes


def test_folders_that_hold_no_model_are_named_as_such(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match=r"holds no config\.json"):
        check_model_source(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        check_model_source(tmp_path / "notes.txt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match=r"config\.json .* cannot be read"):
        check_model_source(tmp_path / "broken")
    no_processor = tmp_path / "no_processor"
    no_processor.mkdir()
    shutil.copy(tiny_model_dir("llava") / "config.json", no_processor / "config.json")
    with pytest.raises(UnsupportedModelError, match="no processor"):
        check_model_source(no_processor)
    with pytest.raises(ModelNotFoundError, match="empty"):
        check_model_source("  ")


def test_a_folder_without_weights_fails_in_one_line(tmp_path: Path, tiny_model_dir: Callable[[str], Path]) -> None:
    folder = tmp_path / "llava"
    shutil.copytree(tiny_model_dir("llava"), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert message.startswith(f"Could not load {str(folder)!r}") and ".." not in message
    assert "\n" not in message


def test_a_good_folder_loads(tiny_model_dir: Callable[[str], Path]) -> None:
    source = check_model_source(tiny_model_dir("llava"))
    assert (source.kind, source.cached_only) == ("folder", False)
    engine = SafeCoDe.from_pretrained(str(tiny_model_dir("llava")))
    assert engine.model_name == str(tiny_model_dir("llava"))


# --------------------------------------------------------------------------- hub ids


def test_hub_id_offline_and_not_cached_fails_at_once(lookups: list[str], hub_cache: Any) -> None:
    # conftest sets HF_HUB_OFFLINE=1, as an offline deployment would
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE") as info:
        SafeCoDe.from_pretrained("llava-hf/llava-1.5-7b-hf")
    assert not isinstance(info.value, HubUnreachableError)
    assert lookups == []


def test_hub_id_without_network_fails_after_one_attempt(lookups: list[str], online: None, hub_cache: Any) -> None:
    for _ in range(2):
        lookups.clear()
        with pytest.raises(HubUnreachableError, match="cannot be reached") as info:
            SafeCoDe.from_pretrained("llava-hf/llava-1.5-7b-hf")
    assert "HF_HUB_OFFLINE=1" in str(info.value)
    # One request, no retries (transformers alone retried for ~140 s). The first call may also
    # see huggingface_hub fetch its user-agent registry, once per process; hence the second call.
    assert len(lookups) == 1


def test_cached_hub_model_loads_offline_and_without_network(
    lookups: list[str],
    monkeypatch: pytest.MonkeyPatch,
    hub_cache: Callable[[str, Path], None],
    tiny_model_dir: Callable[[str], Path],
    tmp_path: Path,
) -> None:
    hub_cache("tiny-org/tiny-llava", tiny_model_dir("llava"))
    source = check_model_source("tiny-org/tiny-llava")
    assert (source.kind, source.cached_only) == ("hub", True)
    model, processor = load_pretrained("tiny-org/tiny-llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor is not None
    assert lookups == []

    # Online but unreachable: one failed request, then the cached copy.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    check_model_source("tiny-org/tiny-llava")  # once per process huggingface_hub also asks for its registry
    lookups.clear()
    assert check_model_source("tiny-org/tiny-llava").cached_only
    assert len(lookups) == 1

    # A cached text-only model is named as such too.
    hub_cache("tiny-org/tiny-lm", text_only_model(tmp_path / "lm"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnsupportedModelError, match="text-only"):
        check_model_source("tiny-org/tiny-lm")


def test_hub_answers_are_turned_into_clear_errors(monkeypatch: pytest.MonkeyPatch, online: None, hub_cache: Any) -> None:
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def answer(error: type[Exception]) -> Callable[..., Any]:
        def model_info(self: Any, repo_id: str, **kwargs: Any) -> Any:
            response = httpx.Response(404, request=httpx.Request("GET", "https://hub.invalid"))
            raise error("no", response=response)

        return model_info

    monkeypatch.setattr(HfApi, "model_info", answer(RepositoryNotFoundError))
    with pytest.raises(ModelNotFoundError, match="No model 'org/nothing' on the Hugging Face hub"):
        check_model_source("org/nothing")
    monkeypatch.setattr(HfApi, "model_info", answer(GatedRepoError))
    with pytest.raises(ModelNotFoundError, match="gated"):
        check_model_source("org/gated")
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: None)
    assert check_model_source("org/there") == loading.ModelSource("hub", "org/there")


def test_hub_offline_reads_the_environment_now(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert loading.hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not loading.hub_offline()


def test_config_checks_accept_custom_code_and_name_other_types() -> None:
    loading.check_model_config({"model_type": "x", "auto_map": {"AutoModelForImageTextToText": "m.X"}}, "'x'")
    with pytest.raises(UnsupportedModelError, match="cannot load as image-text-to-text"):
        loading.check_model_config({"model_type": "clip", "vision_config": {}}, "'clip'")
    assert json.dumps(loading.ModelSource("folder", "/m").__dict__)  # a plain value
