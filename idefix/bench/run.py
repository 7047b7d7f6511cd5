"""`run_bench(options) -> dict`: every engine measured on one checkpoint in one process, with the roofline.

Engines run one after the other (each is freed before the next loads, so each peak RSS is its own), after
the checkpoint files were read once, so every load finds them in the page cache. The machine's limits are
probed before the first engine and after the last, and the best of both is the roofline (a busy machine
lowers a probe as much as the figures). An engine that fails is reported with its error; the others run.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from idefix.bench.checkpoint import random_checkpoint
from idefix.bench.machine import machine, warm_page_cache
from idefix.bench.measure import Log, Side, measure
from idefix.bench.options import BenchOptions
from idefix.bench.report import ratios
from idefix.bench.roofline import DecodeCost, bandwidth_gbs, gemm_gflops, vision_flops_per_tile, vision_gemm_shape
from idefix.bench.stats import Stats
from idefix.hub import resolve_model
from idefix.model.config import Idefics3Config

SCHEMA = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    shape = vision_gemm_shape(config, options.tiles)
    first = _probe(options, shape, log)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": options.model or options.random_shape,
        "random_weights": options.random_shape is not None,
        "checkpoint": str(path),
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(options).items()},
        "machine": machine(),
        "workload": {},
        "runs": [],
        "skipped": {},
    }
    for label, make in _sides(path, options, result["skipped"], log):
        side = make()
        try:
            result["runs"].append(measure(side, options, result["workload"], log))
        except Exception as exc:  # one engine failing must not lose the others' figures
            log(f"{label}: failed: {type(exc).__name__}: {exc}")
            result["runs"].append({"engine": side.name, "label": label, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            side.close()
    last = _probe(options, shape, log)
    bandwidth, gemm = Stats(first[0].samples + last[0].samples), Stats(first[1].samples + last[1].samples)
    result["roofline"] = _roofline(options, config, shape, bandwidth, gemm)
    _add_decode_bounds(result)
    result["machine"]["load_average_before"] = list(load_before)
    result["machine"]["load_average_after"] = list(os.getloadavg())
    result["ratios"] = ratios(result["runs"])
    return result


def _probe(options: BenchOptions, shape: tuple[int, int, int], log: Log) -> tuple[Stats, Stats]:
    log(f"probing memory bandwidth ({options.bandwidth_mib} MiB buffer) and GEMM throughput")
    device = torch.device(options.device)
    return bandwidth_gbs(options.bandwidth_mib, device), gemm_gflops(*shape, dtype=DTYPES[options.dtype], device=device)


def _roofline(
    options: BenchOptions, config: Idefics3Config, shape: tuple[int, int, int], bandwidth: Stats, gemm: Stats
) -> dict[str, Any]:
    flops = vision_flops_per_tile(config)
    return {
        "bandwidth_gbs": bandwidth.to_json(),
        "gemm": {"shape": list(shape), "dtype": options.dtype, "gflops": gemm.to_json()},
        "vision_flops_per_tile": flops,
        "vision_bound_ms_per_tile": flops / (gemm.max * 1e9) * 1e3,
        "decode_context": options.decode_prompt_tokens + options.decode_tokens / 2,
    }


def _add_decode_bounds(result: dict[str, Any]) -> None:
    """Next to every decode figure: the bound for its batch and the share of it reached. An engine that cannot
    tell its weight bytes (mistral.rs) reads what plain idefix reads from the same checkpoint and dtype."""
    roof = result["roofline"]
    gbs, gflops = roof["bandwidth_gbs"]["max"], roof["gemm"]["gflops"]["max"]
    costs = [run.get("decode_cost") for run in result["runs"] if run["label"] == "idefix"]
    fallback = costs[0] if costs else None
    for run in result["runs"]:
        raw = run.get("decode_cost") or fallback
        if raw is None or "metrics" not in run:
            continue
        cost = DecodeCost(**raw)
        for batch, entry in run["metrics"].get("decode", {}).items():
            bound = cost.bound_tok_s(int(batch), roof["decode_context"], gbs, gflops)
            entry.update(roofline_tok_s=bound, roofline_fraction=entry["tok_s"]["median"] / bound)


def _sides(path: Path, options: BenchOptions, skipped: dict[str, str], log: Log) -> Iterator[tuple[str, Any]]:
    """(label, factory) of each engine to measure, idefix first."""
    from idefix.bench.idefix_side import IdefixSide

    factories: list[tuple[str, Callable[[], Side]]] = [("idefix", lambda: IdefixSide(path, options))]
    for qtype in options.isq:
        factories.append((f"idefix {qtype}", functools.partial(IdefixSide, path, options, isq=qtype)))
    yield from factories
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
