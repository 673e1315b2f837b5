"""`safecode-guard bench --stall 4096`: how long running streams wait while a long prompt arrives.

A stream decodes (a short prompt with an image); after its first tokens, a
request with a prompt of about N tokens and an image arrives (two rows: its
real and noised view). Every decode step gives each running stream its next
token, so the gaps between decode steps (timed with the scheduler's
`on_step` hook) are the stream's inter-token gaps. Two settings, on two model
objects with the same weights (one scheduler each), interleaved round by round:

    whole    `prefill_chunk_tokens=None`: the long prompt in one forward
    chunked  `prefill_chunk_tokens` (default 512): a chunk at a time, a decode step between

Reported per setting (medians over rounds): the median gap before the long
prompt arrived, the worst gap from its arrival until its answer ended, and its
time to first token. The target of issue 23 is checked: the worst gap with
chunked prefill under 1 s on the CPU preset.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import BatchingConfig
from ..engine.core import SafeCoDe
from .common import bench_model, run_off_main
from .scene import PROMPT, scene_image

__all__ = ["StallReport", "StallStats", "run_stall_bench"]

TARGET_WORST_GAP_S = 1.0
BASELINE_STEPS = 20
"""Decode steps of the running stream timed before the long prompt arrives."""


@dataclass
class StallStats:
    setting: str
    chunk_tokens: int | None
    median_gap_s: float
    worst_gap_s: float
    long_ttft_s: float


@dataclass
class StallReport:
    preset: str
    device: str
    dtype: str
    params_m: float
    prompt_tokens: int
    rounds: int
    rows: list[StallStats] = field(default_factory=list)

    def get(self, setting: str) -> StallStats:
        return next(r for r in self.rows if r.setting == setting)

    def table(self) -> str:
        head = f"{'prefill':<16} {'median gap s':>12} {'worst gap s':>11} {'long TTFT s':>11}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            name = r.setting if r.chunk_tokens is None else f"{r.setting} ({r.chunk_tokens})"
            lines.append(f"{name:<16} {r.median_gap_s:>12.3f} {r.worst_gap_s:>11.3f} {r.long_ttft_s:>11.3f}")
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        whole, chunked = self.get("whole"), self.get("chunked")
        lines = [
            f"worst inter-token gap while a {self.prompt_tokens}-token prompt arrives: {whole.worst_gap_s:.3f} s whole, "
            f"{chunked.worst_gap_s:.3f} s chunked ({whole.worst_gap_s / chunked.worst_gap_s:.1f}x shorter)",
        ]
        if self.device.startswith("cpu") and self.preset == "cpu":
            lines.append(
                f"chunked worst gap {chunked.worst_gap_s:.3f} s  target < {TARGET_WORST_GAP_S:g} s: "
                + ("OK" if chunked.worst_gap_s < TARGET_WORST_GAP_S else "MISSED")
            )
        return lines


def long_text(processor: Any, image: Any, tokens: int, sentence: str) -> str:
    """A user text that makes the prompt (with `image`) about `tokens` tokens long."""

    def length(text: str) -> int:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
            add_generation_prompt=True, tokenize=False,
        )
        return int(processor(images=[[image]], text=[prompt], return_tensors="pt")["input_ids"].shape[1])

    per = max(1, length(sentence) - length(""))
    text = " ".join([sentence] * max(1, (tokens - length("")) // per))
    while length(text) < tokens:
        text += " " + sentence
    return text


def run_stall_bench(
    preset: str = "cpu",
    *,
    prompt_tokens: int = 4096,
    rounds: int = 3,
    chunk_tokens: int = 512,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> StallReport:
    """Build the preset model twice (same weights) and time both settings `rounds` times, interleaved."""

    say = progress or (lambda _msg: None)
    dev, model_whole, processor = bench_model(preset, device, say)
    _, model_chunked, _ = bench_model(preset, device, say)  # same seed, same weights; a scheduler of its own
    settings = {"whole": None, "chunked": chunk_tokens}
    engines = {
        name: SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=(), batching=BatchingConfig(prefill_chunk_tokens=chunk))
        for (name, chunk), model in zip(settings.items(), (model_whole, model_chunked), strict=True)
    }
    size = processor.image_processor.crop_size["height"]
    image = scene_image(size)
    text = run_off_main(lambda: long_text(processor, image, prompt_tokens, PROMPT))
    long_msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    short_msgs = [{"role": "user", "content": [{"type": "image", "image": image.rotate(90)}, {"type": "text", "text": PROMPT}]}]
    length = run_off_main(lambda: engines["whole"].generate(long_msgs, max_new_tokens=1).usage.prompt_tokens)
    context = model_whole.config.get_text_config().max_position_embeddings

    def one(engine: SafeCoDe) -> tuple[float, float, float]:
        steps: list[float] = []
        enough = threading.Event()

        def on_step(_rows: int) -> None:
            steps.append(time.perf_counter())
            if len(steps) > BASELINE_STEPS:
                enough.set()

        engine.scheduler.on_step = on_step
        engine.scheduler.clear_image_cache()  # each round encodes its images
        running = run_off_main(lambda: engine.stream(short_msgs, max_new_tokens=context - 300))
        try:
            enough.wait(120)
            arrived = time.perf_counter()
            result = run_off_main(lambda: engine.generate(long_msgs, max_new_tokens=4))
            ended = time.perf_counter()
        finally:
            running.close()
            engine.scheduler.on_step = None
        before = [b - a for a, b in itertools.pairwise(steps) if b <= arrived]
        during = [b - a for a, b in itertools.pairwise(steps) if b > arrived and a < ended]
        ttft = result.timings["queue_s"] + result.timings["prefill_s"]
        return statistics.median(before), max(during), ttft

    say("warming up ...")
    for engine in engines.values():
        one(engine)
    measured: dict[str, list[tuple[float, float, float]]] = {name: [] for name in engines}
    for r in range(rounds):
        say(f"round {r + 1}/{rounds}")
        for name, engine in engines.items():
            measured[name].append(one(engine))
    report = StallReport(
        preset=preset,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        dtype=str(model_whole.dtype).removeprefix("torch."),
        params_m=sum(p.numel() for p in model_whole.parameters()) / 1e6,
        prompt_tokens=length,
        rounds=rounds,
    )
    for name, values in measured.items():
        report.rows.append(
            StallStats(
                setting=name,
                chunk_tokens=settings[name],
                median_gap_s=statistics.median(v[0] for v in values),
                worst_gap_s=statistics.median(v[1] for v in values),
                long_ttft_s=statistics.median(v[2] for v in values),
            )
        )
    return report
