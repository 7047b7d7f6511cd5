"""Repeated timings with their median and spread, and peak memory of one stretch of work."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Stats:
    """Samples of one measurement (warm-up runs excluded); median, min, max of them."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def scaled(self, factor: float) -> Stats:
        return Stats(tuple(s * factor for s in self.samples))

    def inverted(self, numerator: float) -> Stats:
        """numerator / each sample: seconds -> a rate."""
        return Stats(tuple(numerator / s for s in self.samples))

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": len(self.samples), **asdict(self)}


def repeat(fn: Callable[[int], float], warmup: int, repeats: int) -> Stats:
    """Call fn(i) warmup + repeats times (i counts from 0 over all calls, so each call may use distinct
    inputs); keep the values the last `repeats` calls return."""
    values = [fn(i) for i in range(warmup + repeats)]
    return Stats(tuple(values[warmup:]))


def timed(fn: Callable[[], object]) -> float:
    """Seconds fn() takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PeakMemory:
    """Peak resident memory (and CUDA memory) over a `with` block.

    The kernel's high-water mark (VmHWM) is reset on entry where /proc allows it, so the peak is that of
    the block; elsewhere it is the process's peak so far (`reset` False in the result).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset = False
        self.rss_mib = 0.0
        self.cuda_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_mib = _peak_rss_mib()
        if self.device.type == "cuda":
            self.cuda_mib = torch.cuda.max_memory_allocated(self.device) / 2**20

    def to_json(self) -> dict[str, Any]:
        return {"peak_rss_mib": self.rss_mib, "peak_cuda_mib": self.cuda_mib, "rss_peak_reset": self.reset}


def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
