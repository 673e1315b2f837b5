"""`safecode-guard bench --constrained`: what a JSON-schema grammar costs per token, side by side.

The same requests (one prompt, different scenes) are answered with and
without a schema (`constrained.json_schema_constraint(BENCH_SCHEMA)`), one at
a time and N at once (N callers in threads, decoded together by the model's
scheduler), interleaved round by round so that drift hits both alike. Every
answer decodes exactly `new_tokens` greedy tokens: end tokens are ignored, and
the schema asks for more items than `new_tokens` can hold, so the grammar is
never complete early. Reported: ms per decode step (wall time / `new_tokens`,
the fastest of the rounds: on a shared machine the least disturbed run is the
truest) for each (schema, N) and the schema's overhead; the same in process
CPU time (all threads; other processes' load moves it far less than wall
time, though idle OpenMP threads spin more when starved); the grammar's share
of the constrained runs' wall time, timed inside the decoding loop (mask,
apply and advance of every row; a ratio within the same runs, so it holds up
where other processes make end-to-end times noisy); and the one-time costs
(the tokenizer's llguidance view, a schema's compile, a cached lookup, a row's
fresh matcher). Target (issue 20): at most 10% more per token at concurrency 8
on the CPU preset.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["BENCH_SCHEMA", "ConstrainedReport", "run_constrained_bench"]

TARGET_LEVEL = 8
TARGET_OVERHEAD = 0.10

#: A scene report with more hazards than any answer of the bench can hold (64 items of ~20 tokens).
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "scene": {"type": "string", "maxLength": 40},
        "hazards": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "what": {"type": "string", "maxLength": 16},
                    "severity": {"enum": ["low", "medium", "high"]},
                    "near": {"type": "boolean"},
                },
                "required": ["what", "severity", "near"],
            },
        },
    },
    "required": ["scene", "hazards"],
}


@dataclass
class ConstrainedReport:
    preset: str
    device: str
    vocab_size: int
    new_tokens: int
    rounds: int
    levels: list[int]
    step_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """"free" | "schema" -> N -> ms per decode step of the N requests together (fastest round)."""
    cpu_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Same keys: process CPU ms per decode step (median round)."""
    grammar_share: dict[int, float] = field(default_factory=dict)
    """N -> the fraction of the constrained runs' wall time spent masking and advancing grammars."""
    tokenizer_s: float = 0.0
    compile_ms: float = 0.0
    cached_ms: float = 0.0
    row_start_ms: float = 0.0
    mask_ms: float = 0.0
    """One row's mask + apply + advance, per token (measured apart from decoding)."""
    cache: dict[str, float] = field(default_factory=dict)

    def overhead(self, level: int) -> float:
        return self.step_ms["schema"][level] / self.step_ms["free"][level] - 1.0

    def cpu_overhead(self, level: int) -> float:
        return self.cpu_ms["schema"][level] / self.cpu_ms["free"][level] - 1.0

    def table(self) -> str:
        head = (
            f"{'N':>3} {'free ms/step':>13} {'schema ms/step':>15} {'overhead':>9} "
            f"{'free cpu ms':>12} {'schema cpu ms':>14} {'cpu overhead':>13} {'grammar share':>14}"
        )
        lines = [head, "-" * len(head)]
        for n in self.levels:
            lines.append(
                f"{n:>3} {self.step_ms['free'][n]:>13.2f} {self.step_ms['schema'][n]:>15.2f} "
                f"{self.overhead(n) * 100:>8.1f}% {self.cpu_ms['free'][n]:>12.2f} {self.cpu_ms['schema'][n]:>14.2f} "
                f"{self.cpu_overhead(n) * 100:>12.1f}% {self.grammar_share[n] * 100:>13.1f}%"
            )
        lines += [
            "",
            f"one-time: tokenizer view {self.tokenizer_s * 1000:.1f} ms (once per model), schema compile "
            f"{self.compile_ms:.2f} ms (once per schema), cached lookup {self.cached_ms:.3f} ms, "
            f"a row's fresh matcher {self.row_start_ms:.3f} ms",
            f"mask + apply + advance, one row: {self.mask_ms:.3f} ms/token (vocabulary {self.vocab_size})",
            f"grammar cache over the run: {int(self.cache.get('misses', 0))} compile(s), "
            f"{int(self.cache.get('hits', 0))} hit(s)",
        ]
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        if TARGET_LEVEL not in self.levels:
            return []
        o, cpu, share = self.overhead(TARGET_LEVEL), self.cpu_overhead(TARGET_LEVEL), self.grammar_share[TARGET_LEVEL]
        return [
            f"at concurrency {TARGET_LEVEL}: schema adds {o * 100:.1f}% per token end to end (wall)  target <= "
            f"{TARGET_OVERHEAD * 100:g}%: " + ("OK" if o <= TARGET_OVERHEAD else "MISSED"),
            f"at concurrency {TARGET_LEVEL}: schema adds {cpu * 100:.1f}% per token in process CPU time  target <= "
            f"{TARGET_OVERHEAD * 100:g}%: " + ("OK" if cpu <= TARGET_OVERHEAD else "MISSED"),
            f"at concurrency {TARGET_LEVEL}: the grammar takes {share * 100:.1f}% of the constrained decode time "
            f"(timed in the loop)  target <= {TARGET_OVERHEAD * 100:g}%: " + ("OK" if share <= TARGET_OVERHEAD else "MISSED"),
        ]


def _one_time_costs(engine: Any, report: ConstrainedReport) -> None:
    """Cold costs on a compiler of their own (the engine's cache stays as the run leaves it)."""
    # the model stack (torch, llguidance) loads when a benchmark runs, not on import
    from ..constrained import GrammarCompiler, json_schema_constraint

    c = json_schema_constraint(BENCH_SCHEMA)
    fresh = GrammarCompiler(engine.tokenizer, engine._eos_ids, engine._vocab_size)
    t0 = time.perf_counter()
    fresh._tokenizer()
    report.tokenizer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh.compile(c)
    report.compile_ms = (time.perf_counter() - t0) * 1000
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        fresh.compile(c)
    report.cached_ms = (time.perf_counter() - t0) * 1000 / reps
    compiled = fresh.compile(c)
    t0 = time.perf_counter()
    for _ in range(reps):
        fresh.row(compiled)
    report.row_start_ms = (time.perf_counter() - t0) * 1000 / reps
    # the mask's own cost: a row walking its grammar on random scores
    row, gen, steps = fresh.row(compiled), torch.Generator().manual_seed(0), 0
    t0 = time.perf_counter()
    for _ in range(report.new_tokens):
        scores = row.apply(torch.randn(engine._vocab_size, generator=gen))
        row.accept(int(scores.argmax()))
        steps += 1
    report.mask_ms = (time.perf_counter() - t0) * 1000 / steps


def run_constrained_bench(
    preset: str = "cpu",
    *,
    levels: Sequence[int] = (1, 8),
    rounds: int = 5,
    new_tokens: int = 64,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ConstrainedReport:
    """Build the preset model and time free and schema-constrained decoding at every level, interleaved."""
    # the model stack (torch, transformers, llguidance) loads when the benchmark runs, not on import
    from ..constrained import json_schema_constraint
    from ..engine.core import SafeCoDe
    from .common import bench_model, run_off_main
    from .scene import PROMPT, scene_image

    say = progress or (lambda _msg: None)
    dev, model, processor = bench_model(preset, device, say)
    engine = SafeCoDe(model, processor, judge="fixed:safe", eos_token_ids=())
    size = processor.image_processor.crop_size["height"]
    constraint = json_schema_constraint(BENCH_SCHEMA)

    def messages(i: int) -> list[dict[str, Any]]:
        img = scene_image(size)
        img.paste((135, 190 - 7 * (i % 16), 235 - 5 * (i % 16)), (0, 0, size, size // 8))
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}]

    def together(n: int, schema: bool) -> tuple[float, float]:
        """(wall, process CPU) seconds for n requests at once (n callers in threads, as a server has)."""
        kwargs: dict[str, Any] = {"max_new_tokens": new_tokens}
        if schema:
            kwargs["constraint"] = constraint
        start = threading.Barrier(n + 1)
        lengths: list[int] = []

        def caller(i: int) -> None:
            start.wait()
            lengths.append(len(engine.generate(messages(i), **kwargs).token_ids))

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        start.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        for t in threads:
            t.join()
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        if lengths != [new_tokens] * n:  # a shorter answer would make its per-step time look cheaper
            raise RuntimeError(f"expected {n} answers of {new_tokens} tokens; got {sorted(lengths)}")
        return total, cpu

    report = ConstrainedReport(
        preset=preset,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        vocab_size=engine._vocab_size,
        new_tokens=new_tokens,
        rounds=rounds,
        levels=list(levels),
    )
    say("one-time costs ...")
    run_off_main(lambda: _one_time_costs(engine, report))
    say("warming up ...")
    together(2, False)
    together(2, True)
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in ("free", "schema") for n in levels}
    cpus: dict[tuple[str, int], list[float]] = {key: [] for key in times}
    masked: dict[int, float] = dict.fromkeys(levels, 0.0)
    stats = engine.grammars.stats
    for r in range(rounds):
        for n in levels:
            say(f"concurrency {n}: round {r + 1}/{rounds}")
            # alternate which goes first, so neither always runs on a warmer machine
            order = ("free", "schema") if r % 2 == 0 else ("schema", "free")
            for kind in order:
                before = stats["mask_s"]
                wall, cpu = together(n, kind == "schema")
                times[(kind, n)].append(wall)
                cpus[(kind, n)].append(cpu)
                masked[n] += stats["mask_s"] - before
    for (kind, n), values in times.items():
        report.step_ms.setdefault(kind, {})[n] = min(values) * 1000 / new_tokens
        report.cpu_ms.setdefault(kind, {})[n] = statistics.median(cpus[(kind, n)]) * 1000 / new_tokens
    for n in levels:
        report.grammar_share[n] = masked[n] / sum(times[("schema", n)])
    report.cache = dict(engine.grammars.stats)
    return report
