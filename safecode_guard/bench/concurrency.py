"""`safecode-guard bench --concurrency 1,4,8,16`: many requests at once, side by side.

For each concurrency level N, the same N requests (one prompt, N different
scenes, so every method sees prompts of one length) are answered three ways,
interleaved round by round so that drift hits all alike:

    batched     SafeCoDe as a backend sees it: N callers, each in its own thread,
                call `generate` at once; the model's scheduler decodes them together
    serialised  SafeCoDe one request after another (what a per-model lock gave):
                all N arrive at once, each waits for the ones before it
    plain       `model.generate` on one static batch of the N prompts (processor
                call included, as the others include theirs): the throughput
                ceiling of plain decoding, without SafeCoDe

SafeCoDe runs with a fixed verdict (no judge cost) and every method decodes
exactly `new_tokens` greedy tokens (end tokens are ignored), so tokens per
second compare like with like.

`--mix` makes the N requests chat traffic instead (`_workload`): prompts of
different lengths, some without an image, answers of different lengths, and
SafeCoDe with its self judge (one extra prefill per request, whose image
features the answer reuses). Tokens/s counts the tokens the requests asked
for; plain `generate` pads the N prompts into one static batch and decodes
them all to the longest answer, as a static batch must. Each batched answer is
also compared with the same request's serialised answer (its solo run). No method streams: time to first token is the
moment the first token existed (the engine's own timings for SafeCoDe; the
first logits-processor call after the prefill for `generate`). Model work runs
off the main thread for every method, as in a server (with GNU OpenMP a main
thread that ran torch ops slows other threads' parallel regions on few cores). Reported per method: tokens/s, p50 and p95
latency (arrival to last token), p95 time to first token, and the peak
memory the run added (CUDA allocator on GPU; sampled RSS on CPU). The
targets of SPEC section 7 are checked at concurrency 8: batched >= 4x the
tokens/s of serialised and >= 0.8x plain. Timings are wall clock: compare
ratios within one run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import BatchingConfig
from ..engine.core import SafeCoDe
from .common import PeakMemory, bench_model, run_off_main
from .scene import PROMPT, scene_image

__all__ = ["ConcurrencyReport", "LevelStats", "run_concurrency_bench"]

METHODS = ("batched", "serialised", "plain")
TARGET_LEVEL = 8
TARGET_VS_SERIALISED = 4.0
TARGET_VS_PLAIN = 0.8


@dataclass
class LevelStats:
    method: str
    concurrency: int
    tokens_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    p95_ttft_s: float
    peak_mem_mb: float


@dataclass
class ConcurrencyReport:
    preset: str
    device: str
    dtype: str
    params_m: float
    prompt_tokens: int
    new_tokens: int
    rounds: int
    levels: list[int]
    rows: list[LevelStats] = field(default_factory=list)
    mix: bool = False
    """Mixed traffic (`--mix`): prompts from `prompt_tokens` to `prompt_tokens_max` tokens, answers
    of different lengths around `new_tokens`, the self judge on."""
    prompt_tokens_max: int = 0
    answers_equal: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Per level: batched rounds whose every answer equalled its serialised (solo) answer, of all rounds."""

    def get(self, method: str, level: int) -> LevelStats:
        return next(r for r in self.rows if r.method == method and r.concurrency == level)

    def table(self) -> str:
        head = (
            f"{'N':>3} {'method':<11} {'tok/s':>8} {'x serial':>8} {'x plain':>8} "
            f"{'p50 lat s':>9} {'p95 lat s':>9} {'p95 TTFT s':>10} {'peak +MB':>9}"
        )
        lines = [head, "-" * len(head)]
        for level in self.levels:
            serial, plain = self.get("serialised", level), self.get("plain", level)
            for method in METHODS:
                r = self.get(method, level)
                lines.append(
                    f"{level:>3} {method:<11} {r.tokens_per_s:>8.1f} {r.tokens_per_s / serial.tokens_per_s:>8.2f} "
                    f"{r.tokens_per_s / plain.tokens_per_s:>8.2f} {r.p50_latency_s:>9.3f} {r.p95_latency_s:>9.3f} "
                    f"{r.p95_ttft_s:>10.3f} {r.peak_mem_mb:>9.1f}"
                )
        return "\n".join(lines)

    def memory_per_request_mb(self) -> float | None:
        """Peak memory each extra concurrent request added to the batched run (slope over the levels)."""
        if len(self.levels) < 2:
            return None
        lo, hi = min(self.levels), max(self.levels)
        return (self.get("batched", hi).peak_mem_mb - self.get("batched", lo).peak_mem_mb) / (hi - lo)

    def verdicts(self) -> list[str]:
        lines: list[str] = []
        if TARGET_LEVEL in self.levels:
            b, s, p = (self.get(m, TARGET_LEVEL) for m in METHODS)
            vs_serial, vs_plain = b.tokens_per_s / s.tokens_per_s, b.tokens_per_s / p.tokens_per_s
            lines.append(
                f"at concurrency {TARGET_LEVEL}: batched / serialised = {vs_serial:.2f}x  target >= "
                f"{TARGET_VS_SERIALISED:g}x: " + ("OK" if vs_serial >= TARGET_VS_SERIALISED else "MISSED")
            )
            lines.append(
                f"at concurrency {TARGET_LEVEL}: batched / plain static batch = {vs_plain:.2f}x  target >= "
                f"{TARGET_VS_PLAIN:g}x: " + ("OK" if vs_plain >= TARGET_VS_PLAIN else "MISSED")
            )
        for level, (equal, total) in self.answers_equal.items():
            lines.append(
                f"at concurrency {level}: every batched answer equals its solo (serialised) answer in {equal} of "
                f"{total} rounds" + ("" if equal == total else "  MISSED")
            )
        per = self.memory_per_request_mb()
        if per is not None:
            note = "  (CPU: sampled RSS, informational)" if self.device.startswith("cpu") else ""
            lines.append(f"peak memory per extra concurrent request (batched): {per:.2f} MB{note}")
        return lines


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


@dataclass
class _Run:
    total_s: float
    latencies: list[float]
    ttfts: list[float]
    peak_mb: float


@dataclass
class _Request:
    messages: list[dict[str, Any]]
    text: str
    image: Any | None
    new_tokens: int


#: The mixed workload's answer lengths (tokens, for `--new-tokens 128`; scaled with it).
MIX_ANSWER_TOKENS = (24, 128, 40, 96, 32, 64, 48, 112)


def _mix_texts(prompt: str) -> list[str]:
    """Chat traffic's spread of prompt lengths: a few words to a few paragraphs."""
    return [
        "What is in this picture?",
        prompt,
        "Describe the scene in one sentence.",
        " ".join([prompt] * 3),
        "How do I stay safe when hiking alone in the mountains? Give me a short checklist.",
        "List three things you notice about the colours here, and say which one stands out most.",
        prompt + " Answer in detail and give reasons for each point you make.",
        " ".join([prompt] * 2) + " Keep it short.",
    ]


def _workload(mix: bool, n: int, prompt: str, new_tokens: int, scene: Callable[[int], Any]) -> list[_Request]:
    """The N requests of one level: one prompt and length (uniform), or mixed traffic (`mix`).

    Mixed: prompts of different lengths, an image on all but every fifth request, answers of
    different lengths (`MIX_ANSWER_TOKENS` scaled to `new_tokens`).
    """
    out = []
    texts = _mix_texts(prompt)
    for i in range(n):
        text = texts[i % len(texts)] if mix else prompt
        image = None if mix and i % 5 == 4 else scene(i)
        tokens = max(1, round(MIX_ANSWER_TOKENS[i % len(MIX_ANSWER_TOKENS)] * new_tokens / 128)) if mix else new_tokens
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
        out.append(_Request([{"role": "user", "content": content}], text, image, tokens))
    return out


def run_concurrency_bench(
    preset: str = "cpu",
    *,
    levels: Sequence[int] = (1, 4, 8, 16),
    rounds: int = 3,
    new_tokens: int = 128,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    mix: bool = False,
    chunk_tokens: int | None = 512,
) -> ConcurrencyReport:
    """Build the preset model and time the three methods at every level, interleaved.

    `mix`: mixed traffic with the self judge on (see `_workload`); each batched answer is also
    checked against the same request's serialised answer (its solo run).
    """

    say = progress or (lambda _msg: None)
    dev, model, processor = bench_model(preset, device, say)  # off the main thread, as every method runs
    batching = BatchingConfig(prefill_chunk_tokens=chunk_tokens)
    engine = SafeCoDe(model, processor, judge="self" if mix else "fixed:safe", eos_token_ids=(), batching=batching)
    size = processor.image_processor.crop_size["height"]

    def scene(i: int) -> Any:
        # the same drawing on different sky colours: distinct requests (and images of one size)
        img = scene_image(size)
        img.paste((135, 190 - 7 * (i % 16), 235 - 5 * (i % 16)), (0, 0, size, size // 8))
        return img

    def template(request: _Request) -> str:
        content = ([{"type": "image"}] if request.image is not None else []) + [{"type": "text", "text": request.text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def first_token_s(result: Any) -> float:
        # the engine's own clock: judge, queue and prefill until the first token existed
        t = result.timings
        return t["judge_s"] + t["queue_s"] + t["prefill_s"]

    Outcome = tuple[list[float], list[float], list[list[int]] | None]

    def batched(requests: list[_Request]) -> Outcome:
        n = len(requests)
        ttft, done, ids = [0.0] * n, [0.0] * n, [[] for _ in range(n)]
        start = threading.Barrier(n + 1)
        t0_box: list[float] = []

        def caller(i: int) -> None:
            start.wait()
            result = engine.generate(requests[i].messages, max_new_tokens=requests[i].new_tokens)
            done[i] = time.perf_counter()
            ttft[i] = first_token_s(result)
            ids[i] = result.token_ids

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        t0_box.append(time.perf_counter())
        start.wait()
        for t in threads:
            t.join()
        t0 = t0_box[0]
        return [d - t0 for d in done], ttft, ids

    def serialised(requests: list[_Request]) -> Outcome:
        def run() -> Outcome:
            t0 = time.perf_counter()
            done, ttft, ids = [], [], []
            for request in requests:
                started = time.perf_counter() - t0  # all arrived at t0: each waits for the ones before
                result = engine.generate(request.messages, max_new_tokens=request.new_tokens)
                done.append(time.perf_counter() - t0)
                ttft.append(started + first_token_s(result))
                ids.append(result.token_ids)
            return done, ttft, ids

        return run_off_main(run)

    def plain(requests: list[_Request]) -> Outcome:
        from transformers import LogitsProcessor, LogitsProcessorList

        first: list[float] = []
        longest = max(r.new_tokens for r in requests)  # a static batch decodes until its longest answer

        class FirstToken(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if not first:
                    first.append(time.perf_counter())
                return scores

        def run() -> Any:
            images = [r.image for r in requests if r.image is not None]
            batch = processor(
                images=images or None, text=[template(r) for r in requests], return_tensors="pt",
                padding=True, padding_side="left",
            ).to(dev)
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(
                    **batch, max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                    logits_processor=LogitsProcessorList([FirstToken()]),
                )
            sync()
            return out, batch

        t0 = time.perf_counter()
        out, batch = run_off_main(run)  # off the main thread, as a server runs it (and as the scheduler does)
        total = time.perf_counter() - t0
        assert out.shape[1] - batch["input_ids"].shape[1] == longest
        return [total] * len(requests), [first[0] - t0] * len(requests), None

    runs_by_method: dict[str, Callable[[list[_Request]], Outcome]] = {
        "batched": batched, "serialised": serialised, "plain": plain,
    }
    say("warming up ...")
    for fn in runs_by_method.values():
        fn(_workload(mix, 2, PROMPT, new_tokens, scene))
    lengths = run_off_main(lambda: [
        int(processor(images=[[r.image]] if r.image is not None else None, text=[template(r)], return_tensors="pt")
            ["input_ids"].shape[1])
        for r in _workload(mix, max(levels), PROMPT, new_tokens, scene)
    ])
    report = ConcurrencyReport(
        preset=preset,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        dtype=str(model.dtype).removeprefix("torch."),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        prompt_tokens=min(lengths),
        new_tokens=new_tokens,
        rounds=rounds,
        levels=list(levels),
        mix=mix,
        prompt_tokens_max=max(lengths),
    )
    for level in levels:
        requests = _workload(mix, level, PROMPT, new_tokens, scene)
        runs: dict[str, list[_Run]] = {m: [] for m in METHODS}
        answers: dict[str, list[list[list[int]]]] = {m: [] for m in METHODS}
        for r in range(rounds):
            say(f"concurrency {level}: round {r + 1}/{rounds}")
            for method, fn in runs_by_method.items():
                engine.scheduler.clear_image_cache()  # features are reused within a request, never across runs
                sync()
                with PeakMemory(dev) as mem:
                    t0 = time.perf_counter()
                    latencies, ttfts, ids = fn(requests)
                    sync()
                    total = time.perf_counter() - t0
                runs[method].append(_Run(total, latencies, ttfts, mem.peak_mb))
                if ids is not None:
                    answers[method].append(ids)
        solo = answers["serialised"][0]  # one request at a time: each answer as it is alone
        equal = sum(ids == solo for ids in answers["batched"])
        report.answers_equal[level] = (equal, len(answers["batched"]))
        for method in METHODS:
            median_total = statistics.median(run.total_s for run in runs[method])
            latencies = [x for run in runs[method] for x in run.latencies]
            ttfts = [x for run in runs[method] for x in run.ttfts]
            report.rows.append(
                LevelStats(
                    method=method,
                    concurrency=level,
                    tokens_per_s=sum(r.new_tokens for r in requests) / median_total,
                    p50_latency_s=_percentile(latencies, 50),
                    p95_latency_s=_percentile(latencies, 95),
                    p95_ttft_s=_percentile(ttfts, 95),
                    peak_mem_mb=max(run.peak_mb for run in runs[method]),
                )
            )
    return report
