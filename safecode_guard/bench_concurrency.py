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
second compare like with like. No method streams: time to first token is the
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


def run_concurrency_bench(
    preset: str = "cpu",
    *,
    levels: Sequence[int] = (1, 4, 8, 16),
    rounds: int = 3,
    new_tokens: int = 128,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ConcurrencyReport:
    """Build the preset model and time the three methods at every level, interleaved."""
    from .bench import PROMPT, _PeakMemory, _scene_image, bench_model, run_off_main
    from .engine import SafeCoDe

    say = progress or (lambda _msg: None)
    dev, model, processor = bench_model(preset, device, say)  # off the main thread, as every method runs
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    size = processor.image_processor.crop_size["height"]
    template = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(template, add_generation_prompt=True, tokenize=False)

    def scenes(n: int) -> list[Any]:
        # the same drawing on N sky colours: distinct requests, prompts of one length
        out = []
        for i in range(n):
            img = _scene_image(size)
            img.paste((135, 190 - 7 * (i % 16), 235 - 5 * (i % 16)), (0, 0, size, size // 8))
            out.append(img)
        return out

    def messages(img: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def first_token_s(result: Any) -> float:
        # the engine's own clock: judge, queue and prefill until the first token existed
        t = result.timings
        return t["judge_s"] + t["queue_s"] + t["prefill_s"]

    def batched(images: list[Any]) -> tuple[list[float], list[float]]:
        n = len(images)
        ttft, done = [0.0] * n, [0.0] * n
        start = threading.Barrier(n + 1)
        t0_box: list[float] = []

        def caller(i: int) -> None:
            start.wait()
            result = engine.generate(messages(images[i]), max_new_tokens=new_tokens)
            done[i] = time.perf_counter()
            ttft[i] = first_token_s(result)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        t0_box.append(time.perf_counter())
        start.wait()
        for t in threads:
            t.join()
        t0 = t0_box[0]
        return [d - t0 for d in done], ttft

    def serialised(images: list[Any]) -> tuple[list[float], list[float]]:
        def run() -> tuple[list[float], list[float]]:
            t0 = time.perf_counter()
            done, ttft = [], []
            for img in images:
                started = time.perf_counter() - t0  # all arrived at t0: each waits for the ones before
                result = engine.generate(messages(img), max_new_tokens=new_tokens)
                done.append(time.perf_counter() - t0)
                ttft.append(started + first_token_s(result))
            return done, ttft

        return run_off_main(run)

    def plain(images: list[Any]) -> tuple[list[float], list[float]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        first: list[float] = []

        class FirstToken(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                if not first:
                    first.append(time.perf_counter())
                return scores

        def run() -> Any:
            batch = processor(images=[[i] for i in images], text=[prompt] * len(images), return_tensors="pt", padding=True)
            batch = batch.to(dev)
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                out = model.generate(
                    **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    logits_processor=LogitsProcessorList([FirstToken()]),
                )
            sync()
            return out, batch

        t0 = time.perf_counter()
        out, batch = run_off_main(run)  # off the main thread, as a server runs it (and as the scheduler does)
        total = time.perf_counter() - t0
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return [total] * len(images), [first[0] - t0] * len(images)

    runs_by_method: dict[str, Callable[[list[Any]], tuple[list[float], list[float]]]] = {
        "batched": batched, "serialised": serialised, "plain": plain,
    }
    say("warming up ...")
    for fn in runs_by_method.values():
        fn(scenes(2))
    prompt_tokens = run_off_main(
        lambda: int(processor(images=[[scenes(1)[0]]], text=[prompt], return_tensors="pt")["input_ids"].shape[1])
    )
    report = ConcurrencyReport(
        preset=preset,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        dtype=str(model.dtype).removeprefix("torch."),
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        rounds=rounds,
        levels=list(levels),
    )
    for level in levels:
        images = scenes(level)
        runs: dict[str, list[_Run]] = {m: [] for m in METHODS}
        for r in range(rounds):
            say(f"concurrency {level}: round {r + 1}/{rounds}")
            for method, fn in runs_by_method.items():
                sync()
                with _PeakMemory(dev) as mem:
                    t0 = time.perf_counter()
                    latencies, ttfts = fn(images)
                    sync()
                    total = time.perf_counter() - t0
                runs[method].append(_Run(total, latencies, ttfts, mem.peak_mb))
        for method in METHODS:
            median_total = statistics.median(run.total_s for run in runs[method])
            latencies = [x for run in runs[method] for x in run.latencies]
            ttfts = [x for run in runs[method] for x in run.ttfts]
            report.rows.append(
                LevelStats(
                    method=method,
                    concurrency=level,
                    tokens_per_s=level * new_tokens / median_total,
                    p50_latency_s=_percentile(latencies, 50),
                    p95_latency_s=_percentile(latencies, 95),
                    p95_ttft_s=_percentile(ttfts, 95),
                    peak_mem_mb=max(run.peak_mb for run in runs[method]),
                )
            )
    return report
