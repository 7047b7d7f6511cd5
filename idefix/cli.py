"""The `idefix` command.

`idefix run [-m MODEL] [--image SRC ...] "question"` answers one question and exits. Problems a user
can fix are printed as one line (`idefix: error: ...`) with exit code 1; wrong flags exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idefix import __version__
from idefix.errors import IdefixError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefix", description="Run Idefics3 / SmolVLM vision-language models.")
    parser.add_argument("--version", action="version", version=f"idefix {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="answer one question (about images) and exit")
    run.add_argument("-m", "--model-id", default=None, help="model folder or hub repo id (default: the demo model)")
    run.add_argument("--image", action="append", default=[], metavar="SRC", help="image path, URL or data URI")
    run.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default cpu)")
    run.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    run.add_argument("prompt", help="the question")
    return parser


def _run(args: argparse.Namespace) -> None:
    from idefix.config import EngineConfig
    from idefix.engine.engine import Engine
    from idefix.generate import stream
    from idefix.loading import load
    from idefix.sampling import SamplingParams

    loaded = load(args.model_id, revision=args.revision, dtype=args.dtype, device=args.device)
    engine = Engine(loaded, EngineConfig(max_num_seqs=1, cache_slots=0))
    content = [{"type": "image_url", "image_url": {"url": src}} for src in args.image]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": args.prompt}]}]
    for out in stream(engine, messages, SamplingParams(temperature=0, max_tokens=args.max_tokens)):
        print(out.text, end="", flush=True)
    print()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except IdefixError as exc:
        print(f"idefix: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
