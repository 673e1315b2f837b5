"""What every benchmark shares: the prompt, the scene image, the preset model, peak memory, reports."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from ..control import run_briefly

__all__ = ["PeakMemory", "bench_model", "print_report", "run_off_main"]

class PeakMemory:
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

    def __enter__(self) -> PeakMemory:
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


def bench_model(preset: str, device: str | None, say: Callable[[str], None]) -> tuple[torch.device, Any, Any]:
    """The preset's random model on its device, built off the main thread, ending on EOS never."""
    # transformers loads when a benchmark builds its model: the CLI's parser stays fast
    from ..testing import build_bench_llava_model

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

    return run_briefly(fn)


