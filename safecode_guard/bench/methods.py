"""`safecode-guard bench`: SafeCoDe's cost against plain `generate`, measured side by side.

One run builds a random-weight Llava-architecture model (preset "cpu": about
10M parameters and a ~150-token image+text prompt; "gpu": the LLaVA-1.5-7B
shape in bf16) and times, interleaved round by round so drift hits all
alike, each of:

    plain       model.generate, greedy, the same number of new tokens
    fixed       SafeCoDe with a fixed verdict (no judge cost)
    self        SafeCoDe with the default self judge (one extra prefill)
    reference   the reference code's pattern: per window step two separate
                no-cache forwards (real, noised), then generate with a fresh prefill

It prints medians, the ratio of each to plain, and the peak memory each
added, and checks the targets of SPEC section 7. Timings are wall clock:
run it on an idle machine, and compare ratios, not absolute numbers.
"""


from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..config import SafeCoDeConfig
from ..engine.adapters import encode_views
from ..engine.core import SafeCoDe
from ..prompting import parse_messages, render_prompt
from .common import PeakMemory, bench_model, run_off_main
from .scene import PROMPT, scene_image

__all__ = ["METHODS", "BenchReport", "MethodStats", "run_bench"]

METHODS = ("plain", "fixed", "self", "reference")
TARGETS = {"cpu": 1.3, "gpu": 1.05}


@dataclass
class MethodStats:
    name: str
    ms_per_token: float
    total_s: float
    new_tokens: int
    ratio_to_plain: float
    peak_mem_mb: float


@dataclass
class BenchReport:
    preset: str
    device: str
    dtype: str
    params_m: float
    prompt_tokens: int
    new_tokens: int
    rounds: int
    methods: list[MethodStats]
    target_ratio: float
    kv_row_mb: float
    """Size of one KV-cache row over prompt + window: the memory SPEC 7 allows above plain."""

    def ratio(self, name: str) -> float:
        return next(m.ratio_to_plain for m in self.methods if m.name == name)

    def table(self) -> str:
        head = f"{'method':<10} {'ms/token':>9} {'total s':>8} {'x plain':>8} {'peak +MB':>9}"
        rows = [
            f"{m.name:<10} {m.ms_per_token:>9.2f} {m.total_s:>8.3f} {m.ratio_to_plain:>8.3f} {m.peak_mem_mb:>9.1f}"
            for m in self.methods
        ]
        return "\n".join([head, "-" * len(head), *rows])

    def verdicts(self) -> list[str]:
        fixed, ref = self.ratio("fixed"), self.ratio("reference")
        lines = [
            f"SafeCoDe (fixed verdict) / plain = {fixed:.3f}  target <= {self.target_ratio}: "
            + ("OK" if fixed <= self.target_ratio else "MISSED"),
            f"reference pattern / SafeCoDe = {ref / fixed:.2f}x slower"
            + ("  (target >= 1.3x: OK)" if ref / fixed >= 1.3 else "  (target >= 1.3x: MISSED)"),
            f"self judge adds {self.ratio('self') - fixed:+.3f} x plain (one extra prefill)",
        ]
        extra = self.peak("fixed") - self.peak("plain")
        memory = f"extra peak memory vs plain = {extra:.1f} MB; one KV-cache row = {self.kv_row_mb:.1f} MB"
        if self.device.startswith("cpu"):
            lines.append(memory + "  (CPU: sampled RSS, informational)")
        else:
            lines.append(memory + ("  (target: within it: OK)" if extra <= self.kv_row_mb else "  (target: within it: MISSED)"))
        return lines

    def peak(self, name: str) -> float:
        return next(m.peak_mem_mb for m in self.methods if m.name == name)


def _kv_row_mb(model: Any, tokens: int) -> float:
    """Bytes of one batch row of a full-attention KV cache over `tokens` positions, in MB."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.tensor([], dtype=model.dtype).element_size()
    return text.num_hidden_layers * 2 * heads * head_dim * tokens * element / 2**20


def _reference_pattern(engine: Any, messages: list[dict], new_tokens: int) -> int:
    """The reference code's decoding: no cache in the window, then `generate` re-prefills."""

    model, cfg = engine.model, engine.config
    conv = parse_messages(messages, engine.policy)
    noise = torch.Generator().manual_seed(cfg.seed)
    noised = [ops.noised_image(img, cfg.noise_std, noise) for img in conv.images]
    prompt = render_prompt(engine.processor, conv.messages, engine.specials)
    real = encode_views(engine.processor, prompt, [list(conv.images)]).to(model.device)
    fake = encode_views(engine.processor, prompt, [noised]).to(model.device)
    for batch in (real, fake):
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    ids = real["input_ids"]
    window = min(cfg.steered_steps, new_tokens)
    with torch.inference_mode():
        for _ in range(window):
            mask = torch.ones_like(ids)
            z_real = model(input_ids=ids, attention_mask=mask, pixel_values=real["pixel_values"]).logits[0, -1]
            z_fake = model(input_ids=ids, attention_mask=mask, pixel_values=fake["pixel_values"]).logits[0, -1]
            token = ops.contrast(z_real.float(), z_fake.float(), cfg.alpha).argmax()
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
        rest = new_tokens - window
        if rest > 0:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=real["pixel_values"],
                max_new_tokens=rest,
                min_new_tokens=rest,
                do_sample=False,
            )
            ids = out
    return new_tokens


def run_bench(
    preset: str = "cpu",
    *,
    rounds: int = 5,
    new_tokens: int = 128,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Build the preset model and time every method `rounds` times, interleaved."""

    say = progress or (lambda _msg: None)
    dev, model, processor = bench_model(preset, device, say)
    size = processor.image_processor.crop_size["height"]
    messages = [{"role": "user", "content": [{"type": "image", "image": scene_image(size)}, {"type": "text", "text": PROMPT}]}]
    cfg = SafeCoDeConfig()
    engines = {
        "fixed": SafeCoDe(model, processor, config=cfg, judge="fixed:safe", eos_token_ids=()),
        "self": SafeCoDe(model, processor, config=cfg, judge="self", eos_token_ids=()),
    }
    batch = run_off_main(lambda: processor(images=[scene_image(size)], text=[
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            add_generation_prompt=True, tokenize=False)
    ], return_tensors="pt").to(dev))
    batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    prompt_tokens = int(batch["input_ids"].shape[1])

    def plain() -> int:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return int(out.shape[1] - prompt_tokens)

    def steered(name: str) -> Callable[[], int]:
        return lambda: engines[name].generate(messages, max_new_tokens=new_tokens).usage.completion_tokens

    runs: dict[str, Callable[[], int]] = {
        "plain": plain,
        "fixed": steered("fixed"),
        "self": steered("self"),
        "reference": lambda: _reference_pattern(engines["fixed"], messages, new_tokens),
    }
    say("warming up ...")
    for fn in runs.values():
        run_off_main(fn)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    tokens: dict[str, int] = {}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for name, fn in runs.items():
            engines["fixed"].scheduler.clear_image_cache()  # features are reused within a request, never across runs
            if dev.type == "cuda":
                torch.cuda.synchronize()
            with PeakMemory(dev) as mem:
                t0 = time.perf_counter()
                tokens[name] = run_off_main(fn)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks.get(name, 0.0), mem.peak_mb)
    medians = {m: statistics.median(v) for m, v in times.items()}
    stats = [
        MethodStats(
            name=m,
            ms_per_token=1000 * medians[m] / max(tokens[m], 1),
            total_s=medians[m],
            new_tokens=tokens[m],
            ratio_to_plain=medians[m] / medians["plain"],
            peak_mem_mb=peaks[m],
        )
        for m in METHODS
    ]
    return BenchReport(
        preset=preset,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        dtype=str(model.dtype).removeprefix("torch."),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rounds=rounds,
        methods=stats,
        target_ratio=TARGETS["gpu" if dev.type == "cuda" else "cpu"],
        kv_row_mb=_kv_row_mb(model, prompt_tokens + cfg.steered_steps),
    )


