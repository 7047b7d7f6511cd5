"""`idefix bench` (and `python -m idefix.bench`): arguments -> BenchOptions -> run_bench -> table + JSON.

    python -m idefix.bench --random-shape smolvlm-256m --dtype bf16 --compare transformers --json out.json

`add_arguments(parser)` fills any argparse parser (the `idefix` command adds its `bench` subcommand with it);
`main(args)` runs it and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from idefix.bench.checkpoint import SHAPES
from idefix.bench.options import COMPARE, MEASUREMENTS, BenchOptions
from idefix.errors import IdefixError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("-m", "--model-id", default=None, help="model folder or hub repo id")
    model.add_argument(
        "--random-shape",
        choices=sorted(SHAPES),
        default=None,
        help="random weights with this model's real shapes, written to the cache folder on first use",
    )
    model.add_argument("--cache-dir", default=None, help="random checkpoints' folder (~/.cache/idefix/bench)")
    model.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    model.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    model.add_argument("--threads", type=int, default=None, help="torch threads for every engine (default: torch's)")
    model.add_argument(
        "--isq",
        nargs="+",
        default=[],
        metavar="TYPE",
        help="also measure idefix quantized in situ to these GGML types (e.g. Q8_0 Q4K)",
    )
    model.add_argument(
        "--compare",
        nargs="+",
        default=[],
        choices=COMPARE,
        help="measure these engines too, in the same run, and print the ratios",
    )
    work = parser.add_argument_group("workload")
    work.add_argument(
        "--concurrency",
        nargs="+",
        type=int,
        default=[1, 4, 16, 64],
        metavar="N",
        help="concurrent requests of the decode measurement (default 1 4 16 64)",
    )
    work.add_argument("--decode-tokens", type=int, default=64, help="tokens each request generates (default 64)")
    work.add_argument("--decode-prompt-tokens", type=int, default=32, help="decode prompt length (default 32)")
    work.add_argument("--prefill-tokens", type=int, default=512, help="prefill prompt length (default 512)")
    work.add_argument("--tiles", type=int, default=2, help="tiles per vision encoder call (default 2)")
    work.add_argument("--image-size", type=int, default=512, help="TTFT test image side in pixels (default 512)")
    work.add_argument("--warmup", type=int, default=1, help="warm-up runs per measurement (default 1)")
    work.add_argument("--repeats", type=int, default=3, help="measured runs per measurement (default 3)")
    work.add_argument("--bandwidth-mib", type=int, default=1024, help="bandwidth probe buffer (default 1024 MiB)")
    work.add_argument("--skip", nargs="+", default=[], choices=MEASUREMENTS, help="leave these measurements out")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the full result here")


def options_from(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model_id,
        random_shape=args.random_shape,
        cache_dir=args.cache_dir,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        isq=tuple(args.isq),
        compare=tuple(dict.fromkeys(args.compare)),
        concurrency=tuple(args.concurrency),
        decode_tokens=args.decode_tokens,
        decode_prompt_tokens=args.decode_prompt_tokens,
        prefill_tokens=args.prefill_tokens,
        tiles=args.tiles,
        image_size=args.image_size,
        warmup=args.warmup,
        repeats=args.repeats,
        bandwidth_mib=args.bandwidth_mib,
        skip=tuple(args.skip),
    )


def main(args: argparse.Namespace) -> int:
    from idefix.bench.report import markdown
    from idefix.bench.run import run_bench

    try:
        options = options_from(args)
        result = run_bench(options)
    except IdefixError as exc:
        print(f"idefix bench: error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    failed = [run for run in result["runs"] if "error" in run or run["metrics"]["errors"]]
    return 1 if failed else 0


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefix.bench", description="Benchmark idefix against its peers.")
    add_arguments(parser)
    return main(parser.parse_args(argv))
