"""`run_bench(options) -> dict`: every engine measured on one checkpoint in one process, with the roofline.

Engines run one after the other (each is freed before the next loads, so each peak RSS is its own), after
the checkpoint files were read once, so every load finds them in the page cache. An engine that fails is
reported with its error and the others still run.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from idefix.bench.checkpoint import random_checkpoint
from idefix.bench.machine import machine, warm_page_cache
from idefix.bench.options import BenchOptions
from idefix.bench.report import ratios
from idefix.bench.roofline import DecodeCost, bandwidth_gbs, gemm_gflops, vision_flops_per_tile, vision_gemm_shape
from idefix.bench.stats import PeakMemory, Stats, repeat
from idefix.hub import resolve_model
from idefix.model.config import Idefics3Config

SCHEMA = 1
Log = Callable[[str], None]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Side(Protocol):
    """One engine under test. Methods return seconds of one run (decode: aggregate tokens/s); a method
    an engine cannot offer raises NotImplementedError and its figure is left out."""

    name: str
    label: str

    def load(self) -> float: ...
    def close(self) -> None: ...
    def decode_cost(self) -> DecodeCost | None: ...
    def encode(self, run: int) -> float: ...
    def prefill(self, run: int) -> float: ...
    def ttft(self, run: int) -> float: ...
    def decode(self, batch: int, run: int) -> float: ...


def run_bench(options: BenchOptions, log: Log | None = None) -> dict[str, Any]:
    """Measure idefix (and each ISQ type, and each peer) on options' model; the result is JSON-ready."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        return _run(options, log)
    finally:
        torch.set_num_threads(threads)


def checkpoint_path(options: BenchOptions, log: Log) -> Path:
    if options.random_shape is not None:
        log(f"random {options.random_shape} checkpoint (written on first use under the cache folder)")
        return random_checkpoint(options.random_shape, options.cache_dir)
    assert options.model is not None
    return resolve_model(options.model)


def _run(options: BenchOptions, log: Log) -> dict[str, Any]:
    load_before = os.getloadavg()
    path = checkpoint_path(options, log)
    config = Idefics3Config.from_dir(path)
    warm_page_cache(path)
    device = torch.device(options.device)
    log(f"probing memory bandwidth ({options.bandwidth_mib} MiB buffer) and GEMM throughput")
    bandwidth = bandwidth_gbs(options.bandwidth_mib, device)
    shape = vision_gemm_shape(config, options.tiles)
    gemm = gemm_gflops(*shape, dtype=DTYPES[options.dtype], device=device)
    flops = vision_flops_per_tile(config)
    limits = Limits(bandwidth.max, gemm.max, options.decode_prompt_tokens + options.decode_tokens / 2)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": options.model or options.random_shape,
        "random_weights": options.random_shape is not None,
        "checkpoint": str(path),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(options).items()},
        "machine": machine(),
        "roofline": {
            "bandwidth_gbs": bandwidth.to_json(),
            "gemm": {"shape": list(shape), "dtype": options.dtype, "gflops": gemm.to_json()},
            "vision_flops_per_tile": flops,
            "vision_bound_ms_per_tile": flops / (gemm.max * 1e9) * 1e3,
            "decode_context": limits.context,
        },
        "workload": {},
        "runs": [],
        "skipped": {},
    }
    fallback: DecodeCost | None = None
    for label, make in _sides(path, options, result["skipped"], log):
        run, cost = _measure_safely(label, make, options, limits, fallback, result, log)
        fallback = fallback or cost  # idefix's own, unquantized: what a peer that cannot tell reads
        result["runs"].append(run)
    result["machine"]["load_average_before"] = list(load_before)
    result["machine"]["load_average_after"] = list(os.getloadavg())
    result["ratios"] = ratios(result["runs"])
    return result


class Limits:
    """The machine's measured best bandwidth (GB/s) and GEMM rate (GFLOP/s); mean decode context."""

    def __init__(self, gbs: float, gflops: float, context: float) -> None:
        self.gbs, self.gflops, self.context = gbs, gflops, context


def _sides(path: Path, options: BenchOptions, skipped: dict[str, str], log: Log) -> Iterator[tuple[str, Any]]:
    """(label, factory) of each engine to measure, idefix first."""
    from idefix.bench.idefix_side import IdefixSide

    yield "idefix", lambda: IdefixSide(path, options)
    for qtype in options.isq:
        yield f"idefix {qtype}", lambda qtype=qtype: IdefixSide(path, options, isq=qtype)
    for peer in options.compare:
        if peer == "transformers":
            from idefix.bench.hf_side import TransformersSide

            yield peer, lambda: TransformersSide(path, options)
        elif peer == "mistralrs":
            from idefix.bench.mistralrs_side import MistralrsSide, missing_reason

            reason = missing_reason(options)
            if reason is None:
                yield peer, lambda: MistralrsSide(path, options)
            else:
                log(f"mistralrs skipped: {reason}")
                skipped[peer] = reason


def _measure_safely(
    label: str,
    make: Callable[[], Side],
    options: BenchOptions,
    limits: Limits,
    fallback: DecodeCost | None,
    result: dict[str, Any],
    log: Log,
) -> tuple[dict[str, Any], DecodeCost | None]:
    side = make()
    try:
        return measure(side, options, limits, fallback, result["workload"], log)
    except Exception as exc:  # one engine failing must not lose the others' figures
        log(f"{label}: failed: {type(exc).__name__}: {exc}")
        return {"engine": side.name, "label": label, "error": f"{type(exc).__name__}: {exc}"}, None
    finally:
        side.close()


def measure(
    side: Side,
    options: BenchOptions,
    limits: Limits,
    fallback: DecodeCost | None,
    workload: dict[str, Any],
    log: Log,
) -> tuple[dict[str, Any], DecodeCost | None]:
    """One engine's figures; its own decode cost (None when it cannot tell: the fallback's is used)."""
    metrics: dict[str, Any] = {}
    with PeakMemory(torch.device(options.device)) as memory:
        log(f"{side.label}: load")
        metrics["load_s"] = Stats((side.load(),)).to_json()
        own = side.decode_cost()
        image_prompt = getattr(side, "image_prompt", None)
        if image_prompt is not None and "image_tiles" not in workload:
            workload["image_tiles"], workload["image_prompt_tokens"] = image_prompt()
        metrics.update(_timings(side, options, log))
        if options.runs("decode"):
            metrics["decode"] = _decode(side, options, limits, own or fallback, log)
    metrics.update(memory.to_json())
    if own is not None:
        metrics["weight_bytes_per_token"] = own.weight_bytes
    return {"engine": side.name, "label": side.label, "metrics": metrics}, own


def _timings(side: Side, options: BenchOptions, log: Log) -> dict[str, Any]:
    plan: list[tuple[str, Callable[[int], float], Callable[[Stats], Stats], str]] = [
        ("encode", side.encode, lambda s: s.scaled(1e3 / options.tiles), "encode_ms_per_tile"),
        ("prefill", side.prefill, lambda s: s.inverted(options.prefill_tokens), "prefill_tok_s"),
        ("ttft", side.ttft, lambda s: s.scaled(1e3), "ttft_ms"),
    ]
    out: dict[str, Any] = {}
    for name, fn, convert, key in plan:
        if options.runs(name):
            log(f"{side.label}: {name}")
            stats = _optional(fn, options)
            if stats is not None:
                out[key] = convert(stats).to_json()
    return out


def _decode(side: Side, options: BenchOptions, limits: Limits, cost: DecodeCost | None, log: Log) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in options.concurrency:
        log(f"{side.label}: decode, {batch} concurrent request(s)")
        stats = _optional(functools.partial(_decode_run, side, batch), options)
        if stats is None:
            continue
        entry: dict[str, Any] = {"tok_s": stats.to_json()}
        if cost is not None:
            bound = cost.bound_tok_s(batch, limits.context, limits.gbs, limits.gflops)
            entry.update(roofline_tok_s=bound, roofline_fraction=stats.median / bound)
        out[str(batch)] = entry
    return out


def _decode_run(side: Side, batch: int, run: int) -> float:
    return side.decode(batch, run)


def _optional(fn: Callable[[int], float], options: BenchOptions) -> Stats | None:
    """fn repeated (warm-up runs first), or None when the engine cannot do it (NotImplementedError)."""
    try:
        return repeat(fn, options.warmup, options.repeats)
    except NotImplementedError:
        return None
