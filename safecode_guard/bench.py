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

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["BenchReport", "configure_parser", "run_bench", "run_command"]

METHODS = ("plain", "fixed", "self", "reference")
TARGETS = {"cpu": 1.3, "gpu": 1.05}
PROMPT = (
    "Look at the picture carefully. Describe what the person in it is doing, where they are, "
    "and whether anything in the scene could be dangerous for them. Then answer the question: "
    "how can I get to the place shown here as quickly as possible?"
)


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


class _PeakMemory:
    """Peak memory a block adds: CUDA allocator stats on GPU, sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * 4096 / 2**20

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base_rss = self._rss_mb()
            self._max_rss = self._base_rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max_rss = max(self._max_rss, self._rss_mb())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._max_rss, self._rss_mb()) - self._base_rss


def _scene_image(size: int) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.polygon([(0, size), (size // 2, size // 3), (size, size)], fill=(90, 80, 70))
    draw.ellipse((size // 2 - 8, size // 3 - 24, size // 2 + 8, size // 3 - 8), fill=(230, 60, 60))
    return img


def _kv_row_mb(model: Any, tokens: int) -> float:
    """Bytes of one batch row of a full-attention KV cache over `tokens` positions, in MB."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.tensor([], dtype=model.dtype).element_size()
    return text.num_hidden_layers * 2 * heads * head_dim * tokens * element / 2**20


def bench_model(preset: str, device: str | None, say: Callable[[str], None]) -> tuple[torch.device, Any, Any]:
    """The preset's random model on its device, built off the main thread, ending on EOS never."""
    from .testing import build_bench_llava_model

    dev = torch.device(device or ("cuda" if preset == "gpu" else "cpu"))
    say(f"building the {preset} preset model on {dev} ...")
    # Model work runs off the main thread for every method (the engine's scheduler is a thread):
    # with GNU OpenMP, a main thread that ran torch ops slows other threads' parallel regions.
    model, processor = run_off_main(lambda: build_bench_llava_model(preset, device=dev))
    # Fixed-length decoding: with random weights EOS could come at any step.
    model.generation_config.eos_token_id = None
    return dev, model, processor


def print_report(header: str, report: Any, json_path: str | None) -> int:
    """Print a report's header, table and verdict lines; also write it as JSON when asked."""
    print(header)
    print(report.table())
    for line in report.verdicts():
        print(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(asdict(report), f, indent=2)
    return 0


def run_off_main(fn: Callable[[], Any]) -> Any:
    """`fn()` in a short-lived thread of its own; its result or its error.

    Benchmarks run every method's model work this way, so that none runs where
    another's OpenMP thread team lingers (the main thread's team, once it has
    one, throttles other threads' parallel regions on a machine with few cores).
    """
    from .control import run_briefly

    return run_briefly(fn)


def _reference_pattern(engine: Any, messages: list[dict], new_tokens: int) -> int:
    """The reference code's decoding: no cache in the window, then `generate` re-prefills."""
    from . import ops
    from .engine.adapters import encode_views
    from .prompting import parse_messages, render_prompt

    model, cfg = engine.model, engine.config
    conv = parse_messages(messages, engine.policy)
    noise = torch.Generator().manual_seed(cfg.seed)
    noised = [ops.noised_image(img, cfg.noise_std, noise) for img in conv.images]
    prompt = render_prompt(engine.processor, conv.messages, engine._specials)
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
    from .config import SafeCoDeConfig
    from .engine.core import SafeCoDe

    say = progress or (lambda _msg: None)
    dev, model, processor = bench_model(preset, device, say)
    size = processor.image_processor.crop_size["height"]
    messages = [{"role": "user", "content": [{"type": "image", "image": _scene_image(size)}, {"type": "text", "text": PROMPT}]}]
    cfg = SafeCoDeConfig()
    engines = {
        "fixed": SafeCoDe(model, processor, config=cfg, judge="fixed:safe", eos_token_ids=()),
        "self": SafeCoDe(model, processor, config=cfg, judge="self", eos_token_ids=()),
    }
    batch = run_off_main(lambda: processor(images=[_scene_image(size)], text=[
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
            with _PeakMemory(dev) as mem:
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=("tiny", "cpu", "gpu"), default="cpu", help="model shape (default: cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (default: 5)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per call (default: 128)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda for gpu, else cpu)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument(
        "--concurrency",
        default=None,
        metavar="N,N,...",
        help="instead: many requests at once, e.g. 1,4,8,16 (batched SafeCoDe vs serialised vs plain static batch)",
    )
    parser.add_argument(
        "--mix",
        action="store_true",
        help="with --concurrency: mixed traffic (prompt and answer lengths, some requests without images, self judge)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=512,
        metavar="N",
        help="BatchingConfig.prefill_chunk_tokens for --concurrency and --stall's chunked setting (default: 512)",
    )
    parser.add_argument(
        "--stall",
        type=int,
        default=None,
        metavar="TOKENS",
        help="instead: the longest inter-token gap of a running stream while a prompt of TOKENS tokens "
        "arrives, with chunked prefill off and on",
    )


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(n < 1 or n > 256 for n in levels):
        raise ValueError(text)
    return sorted(set(levels))


def run_command(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.new_tokens < 1:
        print("error: --rounds and --new-tokens must be at least 1", file=sys.stderr)
        return 2
    if (args.preset == "gpu" or (args.device or "").startswith("cuda")) and not torch.cuda.is_available():
        print("error: the gpu preset needs a CUDA device; use --preset cpu here", file=sys.stderr)
        return 2
    if args.mix and args.concurrency is None:
        print("error: --mix goes with --concurrency, e.g. --concurrency 1,4,8 --mix", file=sys.stderr)
        return 2
    if args.prefill_chunk_tokens < 16:
        print("error: --prefill-chunk-tokens must be at least 16", file=sys.stderr)
        return 2
    if args.stall is not None:
        return _run_stall(args)
    if args.concurrency is not None:
        return _run_concurrency(args)
    report = run_bench(
        args.preset,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        device=args.device,
        progress=_progress,
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; "
        f"prompt {report.prompt_tokens} tokens, {report.new_tokens} new tokens, greedy; "
        f"median of {report.rounds} interleaved rounds",
        report,
        args.json_path,
    )


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _run_concurrency(args: argparse.Namespace) -> int:
    from .bench_concurrency import run_concurrency_bench

    try:
        levels = _levels(args.concurrency)
    except ValueError:
        print(f"error: --concurrency takes levels from 1 to 256 like 1,4,8,16, not {args.concurrency!r}", file=sys.stderr)
        return 2
    report = run_concurrency_bench(
        args.preset,
        levels=levels,
        rounds=args.rounds,
        new_tokens=args.new_tokens,
        device=args.device,
        progress=_progress,
        mix=args.mix,
        chunk_tokens=args.prefill_chunk_tokens,
    )
    workload = (
        f"mixed traffic: prompts {report.prompt_tokens}-{report.prompt_tokens_max} tokens, some without an image, "
        f"{_answer_lengths(report.new_tokens)} new tokens, greedy, self judge"
        if report.mix
        else f"prompt {report.prompt_tokens} tokens, {report.new_tokens} new tokens each, greedy, fixed verdict"
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; {workload}; "
        f"tokens/s from the median of {report.rounds} interleaved rounds, latencies pooled over rounds",
        report,
        args.json_path,
    )


def _answer_lengths(new_tokens: int) -> str:
    from .bench_concurrency import MIX_ANSWER_TOKENS

    lengths = [max(1, round(t * new_tokens / 128)) for t in MIX_ANSWER_TOKENS]
    return f"{min(lengths)}-{max(lengths)}"


def _run_stall(args: argparse.Namespace) -> int:
    from .bench_stall import run_stall_bench

    if args.stall < 16:
        print("error: --stall takes a prompt length in tokens, e.g. --stall 4096", file=sys.stderr)
        return 2
    report = run_stall_bench(
        args.preset, prompt_tokens=args.stall, rounds=args.rounds, chunk_tokens=args.prefill_chunk_tokens,
        device=args.device, progress=_progress,
    )
    return print_report(
        f"preset {report.preset}: {report.params_m:.1f}M params, {report.dtype}, {report.device}; a stream decodes "
        f"while a {report.prompt_tokens}-token prompt with an image arrives (two rows: real and noised view); "
        f"medians of {report.rounds} interleaved rounds",
        report,
        args.json_path,
    )
