"""One engine's figures: load, then each measurement repeated, peak memory over all of it.

A measurement an engine cannot offer (NotImplementedError) is left out; one that fails is reported in
`metrics["errors"]` and the others still run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import torch

from idefix.bench.options import BenchOptions
from idefix.bench.roofline import DecodeCost
from idefix.bench.stats import PeakMemory, Stats, repeat

Log = Callable[[str], None]


class Side(Protocol):
    """One engine under test. Methods return seconds of one run (decode: aggregate tokens/s)."""

    name: str
    label: str

    def load(self) -> float: ...
    def close(self) -> None: ...
    def decode_cost(self) -> DecodeCost | None: ...
    def encode(self, run: int) -> float: ...
    def prefill(self, run: int) -> float: ...
    def ttft(self, run: int) -> float: ...
    def decode(self, batch: int, run: int) -> float: ...


def measure(side: Side, options: BenchOptions, workload: dict[str, Any], log: Log) -> dict[str, Any]:
    """{"engine", "label", "metrics", "decode_cost"}: the side's figures (JSON-ready)."""
    metrics: dict[str, Any] = {"errors": {}}
    with PeakMemory(torch.device(options.device)) as memory:
        log(f"{side.label}: load")
        metrics["load_s"] = Stats((side.load(),)).to_json()
        cost = side.decode_cost()
        image_prompt = getattr(side, "image_prompt", None)
        if image_prompt is not None and "image_tiles" not in workload:
            workload["image_tiles"], workload["image_prompt_tokens"] = image_prompt()
        metrics.update(_timings(side, options, metrics["errors"], log))
        if options.runs("decode"):
            metrics["decode"] = _decode(side, options, metrics["errors"], log)
    metrics.update(memory.to_json())
    if cost is not None:
        metrics["weight_bytes_per_token"] = cost.weight_bytes
    return {
        "engine": side.name,
        "label": side.label,
        "metrics": metrics,
        "decode_cost": None if cost is None else asdict(cost),
    }


def _timings(side: Side, options: BenchOptions, errors: dict[str, str], log: Log) -> dict[str, Any]:
    plan: list[tuple[str, Callable[[int], float], Callable[[Stats], Stats], str]] = [
        ("encode", side.encode, lambda s: s.scaled(1e3 / options.tiles), "encode_ms_per_tile"),
        ("prefill", side.prefill, lambda s: s.inverted(options.prefill_tokens), "prefill_tok_s"),
        ("ttft", side.ttft, lambda s: s.scaled(1e3), "ttft_ms"),
    ]
    out: dict[str, Any] = {}
    for name, fn, convert, key in plan:
        if options.runs(name):
            log(f"{side.label}: {name}")
            stats = _repeated(fn, options, errors, key, log)
            if stats is not None:
                out[key] = convert(stats).to_json()
    return out


def _decode(side: Side, options: BenchOptions, errors: dict[str, str], log: Log) -> dict[str, Any]:
    """{batch: {"tok_s": stats}}; the roofline is added once the whole run is over (see run.py)."""
    out: dict[str, Any] = {}
    for batch in options.concurrency:
        log(f"{side.label}: decode, {batch} concurrent request(s)")
        stats = _repeated(functools.partial(_decode_run, side, batch), options, errors, f"decode x{batch}", log)
        if stats is not None:
            out[str(batch)] = {"tok_s": stats.to_json()}
    return out


def _decode_run(side: Side, batch: int, run: int) -> float:
    return side.decode(batch, run)


def _repeated(
    fn: Callable[[int], float], options: BenchOptions, errors: dict[str, str], key: str, log: Log
) -> Stats | None:
    """fn repeated (warm-up runs first); None when the engine cannot do it or it failed (noted in errors)."""
    try:
        return repeat(fn, options.warmup, options.repeats)
    except NotImplementedError:
        return None
    except Exception as exc:  # one measurement failing must not lose the others
        errors[key] = f"{type(exc).__name__}: {exc}"
        log(f"  failed: {errors[key]}")
        return None
