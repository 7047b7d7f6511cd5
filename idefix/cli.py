"""The `idefix` command line.

mistral.rs-style (`idefix [global flags] vision-plain -m MODEL`, with `-i` for the interactive chat or
`--port` for the server) plus friendlier aliases: `idefix run`, `idefix chat`, `idefix serve`.
Problems a user can fix print one line (`idefix: error: ...`) and exit 1; wrong flags exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from idefix import __version__
from idefix.errors import IdefixError

DTYPES = ["auto", "fp32", "bf16", "fp16"]


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("-m", "--model-id", default=None, help="model folder or hub repo id (default: the demo model)")
    group.add_argument("-a", "--arch", choices=["idefics3"], default=None, help="architecture (read from config.json)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and compute dtype (default auto)")
    group.add_argument("--revision", default=None, help="hub revision: branch, tag or commit")
    group.add_argument("--max-seq-len", type=int, default=4096, help="context per sequence (default 4096)")


def _global_flags(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_argument_group("mode")
    mode.add_argument("-i", "--interactive-mode", action="store_true", help="chat in the terminal")
    mode.add_argument("--port", type=int, default=None, help="serve the OpenAI API on this port")
    mode.add_argument("--serve-ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together (default 16)")
    engine.add_argument("--max-waiting", type=int, default=64, help="queued requests before 503 (default 64)")
    engine.add_argument("--seed", type=int, default=None, help="seed for requests that give none")
    engine.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    engine.add_argument("--log", default=None, metavar="FILE", help="also write the log to FILE")
    engine.add_argument("--token-source", default=None, help="hub token: env:VAR, literal:TOKEN, path:FILE")
    server = parser.add_argument_group("server")
    server.add_argument("--api-key", default=os.environ.get("IDEFIX_API_KEY"), help="require this Bearer token")
    server.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN")
    server.add_argument("--max-body-bytes", type=int, default=32 * 2**20, help="request body cap (default 32 MiB)")
    server.add_argument("--max-images-per-request", type=int, default=16)
    media = parser.add_argument_group("media (image URLs and paths in requests)")
    media.add_argument("--allow-private-media-urls", action="store_true", help="allow loopback / private hosts")
    media.add_argument("--allowed-local-media-path", action="append", default=[], type=Path, metavar="DIR")
    media.add_argument("--max-image-bytes", type=int, default=20 * 2**20, help="per image (default 20 MiB)")
    media.add_argument("--max-image-pixels", type=int, default=40_000_000, help="decoded size (default 40 MP)")
    media.add_argument("--media-connect-timeout", type=float, default=3.0, help="seconds (default 3)")
    media.add_argument("--media-timeout", type=float, default=10.0, help="seconds per fetch (default 10)")
    media.add_argument("--media-max-redirects", type=int, default=3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idefix",
        description="Run Idefics3 / SmolVLM vision-language models: chat, OpenAI-compatible server, one-shot.",
        epilog="examples:\n  idefix -i vision-plain -m HuggingFaceTB/SmolVLM-256M-Instruct\n"
        "  idefix --port 1234 vision-plain -m MODEL\n  idefix run --image shapes.png 'How many circles?'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"idefix {__version__}")
    _global_flags(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _model_flags(commands.add_parser("vision-plain", help="a vision model (mistral.rs syntax)"))
    _model_flags(commands.add_parser("chat", help="chat in the terminal (same as -i)"))
    _model_flags(commands.add_parser("serve", help="serve the OpenAI API (same as --port, default 1234)"))
    run = commands.add_parser("run", help="answer one question and exit")
    _model_flags(run)
    run.add_argument("--image", action="append", default=[], metavar="SRC", help="image path, URL or data URI")
    run.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    run.add_argument("--json", action="store_true", help="print the whole response as JSON")
    run.add_argument("prompt", help="the question")
    return parser


def _load_engine(args: argparse.Namespace) -> object:
    from idefix.config import EngineConfig
    from idefix.engine.engine import Engine
    from idefix.loading import load

    device = "cpu" if args.cpu else ("cuda" if _cuda() else "cpu")
    loaded = load(args.model_id, revision=args.revision, dtype=args.dtype, device=device)
    single = args.command == "run"
    config = EngineConfig(
        max_num_seqs=1 if single else args.max_seqs,
        max_model_len=args.max_seq_len,
        max_waiting=args.max_waiting,
        cache_slots=0 if single else 4,
    )
    return Engine(loaded, config)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(args: argparse.Namespace) -> None:
    from idefix.generate import collect, stream
    from idefix.sampling import SamplingParams

    engine = _load_engine(args)
    content = [{"type": "image_url", "image_url": {"url": src}} for src in args.image]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": args.prompt}]}]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, seed=args.seed)
    outputs = stream(engine, messages, params)  # type: ignore[arg-type]
    if args.json:
        import json
        from dataclasses import asdict

        completion = collect(outputs)
        usage = completion.usage
        print(json.dumps({**asdict(completion), "usage": {**asdict(usage), "total_tokens": usage.total_tokens}}))
        return
    for out in outputs:
        print(out.text, end="", flush=True)
    print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        _model_flags_defaults(parser, args)
    try:
        if args.command == "run":
            _run(args)
        else:
            parser.error("choose what to run: `idefix run`, `idefix chat` (-i) or `idefix serve` (--port)")
    except IdefixError as exc:
        print(f"idefix: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _model_flags_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`idefix -i` with no subcommand runs the demo model: give args the model flags' defaults."""
    defaults = argparse.ArgumentParser(add_help=False)
    _model_flags(defaults)
    for key, value in vars(defaults.parse_args([])).items():
        setattr(args, key, value)


if __name__ == "__main__":
    sys.exit(main())
