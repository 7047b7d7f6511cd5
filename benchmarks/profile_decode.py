"""Where a decode step's time goes: torch.profiler over idefix's batch-N decode steps, top ops by self CPU time.

    python -m benchmarks.profile_decode --random-shape smolvlm-256m --dtype fp32 --batch 1 --steps 32

Prints the op table (and writes a Chrome trace with --trace FILE). Only the pure decode steps are profiled:
the prompts are prefilled and a few steps run before the profiler starts.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from idefix.bench.checkpoint import SHAPES, random_checkpoint
from idefix.bench.workload import text_ids
from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.loading import load
from idefix.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-m", "--model-id", default=None)
    parser.add_argument("--random-shape", choices=sorted(SHAPES), default="smolvlm-256m")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--isq", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="ops to list")
    parser.add_argument("--trace", default=None, help="write a Chrome trace here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model_id or str(random_checkpoint(args.random_shape))
    extra = {"isq": args.isq} if args.isq else {}
    engine = Engine(
        load(path, dtype=args.dtype, progress=False, **extra),
        EngineConfig(max_num_seqs=args.batch, max_model_len=64 + args.steps + 16, cache_slots=0),
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 16, ignore_eos=True)
    for row in range(args.batch):
        engine.add(engine.text_prompt(text_ids(engine.tokenizer, 32, row)), params)
    for _ in range(8):  # prefill + warm decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        seconds = time.perf_counter() - start
    print(f"{args.steps} decode steps of {args.batch} request(s): {seconds / args.steps * 1e3:.1f} ms / step "
          f"(under the profiler), {args.batch * args.steps / seconds:.1f} tok/s")  # fmt: skip
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
