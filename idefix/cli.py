"""The `idefix` command line.

mistral.rs-style (`idefix [global flags] vision-plain -m MODEL`, with `-i` for the interactive chat or
`--port` for the server) plus friendlier aliases: `idefix run`, `idefix chat`, `idefix serve`.
Problems a user can fix print one line (`idefix: error: ...`) and exit 1; wrong flags exit 2 with the
nearest valid choice (see `idefix.cli_parser`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from idefix import __version__
from idefix.cli_parser import Parser, isq_type, positive_int, read_token, token_source
from idefix.errors import IdefixError, ModelLoadError

if TYPE_CHECKING:
    from idefix.engine.engine import Engine

DTYPES = ["auto", "fp32", "bf16", "fp16"]
ARCHES = {"idefics3": ("idefics3", "smolvlm")}  # -a value -> config.json model_type values it covers


def _model_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "-m", "--model-id", default=None, metavar="MODEL", help="model folder or hub repo id (default: the demo model)"
    )
    group.add_argument("-a", "--arch", choices=list(ARCHES), default=None, help="architecture (read from config.json)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and compute dtype (default auto)")
    group.add_argument("--revision", default=None, metavar="REV", help="hub revision: branch, tag or commit")
    group.add_argument(
        "--max-seq-len", type=positive_int, default=4096, metavar="N", help="context per sequence (default 4096)"
    )
    group.add_argument(
        "--from-uqff", default=None, metavar="FILES", help="pre-quantized UQFF file(s), `;`-separated (docs/uqff.md)"
    )
    group.add_argument("--write-uqff", default=None, metavar="DIR", help="after --isq, write the model as UQFF here")


def _answer_flags(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    group = parser.add_argument_group("answers")
    default = f"default {max_tokens}" if max_tokens else "default: until the model stops or the context ends"
    group.add_argument(
        "--max-tokens", type=positive_int, default=max_tokens, metavar="N", help=f"most tokens per answer ({default})"
    )


def _global_flags(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_argument_group("mode")
    mode.add_argument("-i", "--interactive-mode", action="store_true", help="chat in the terminal")
    mode.add_argument("--port", type=int, default=None, metavar="N", help="serve the OpenAI API on this port")
    mode.add_argument(
        "--serve-ip", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)"
    )
    quant = parser.add_argument_group("quantization")
    quant.add_argument(
        "--isq",
        type=isq_type,
        default=None,
        metavar="TYPE",
        help="quantize while loading: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2K Q3K Q4K Q5K Q6K Q8K, or 2 3 4 5 6 8",
    )
    devices = parser.add_argument_group("device mapping (text decoder layers)")
    devices.add_argument(
        "--num-device-layers", default=None, metavar="SPEC", help="e.g. 0:16;1:16 or 16 (the rest on the CPU)"
    )
    devices.add_argument("--topology", default=None, metavar="FILE", help="YAML: layer ranges -> device and isq")
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-seqs", type=positive_int, default=16, metavar="N", help="sequences decoded together (default 16)"
    )
    engine.add_argument(
        "--max-waiting", type=int, default=64, metavar="N", help="queued requests before 503 (default 64)"
    )
    engine.add_argument("--seed", type=int, default=None, metavar="N", help="seed for requests that give none")
    engine.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    engine.add_argument(
        "--no-cuda-graphs", action="store_true", help="on a GPU, run decode steps eagerly instead of as CUDA graphs"
    )
    engine.add_argument("--log", default=None, metavar="FILE", help="also write the log to FILE")
    engine.add_argument(
        "--token-source",
        type=token_source,
        default=None,
        metavar="SOURCE",
        help="hub token: env:VAR, literal:TOKEN, path:FILE, cache (default), none",
    )
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


def build_parser() -> Parser:
    parser = Parser(
        prog="idefix",
        usage="idefix [global flags] COMMAND [command flags]   (idefix COMMAND --help: its flags)",
        description="Run Idefics3 / SmolVLM vision-language models: chat, OpenAI-compatible server, one-shot.",
        epilog="examples:\n  idefix chat                      chat with the bundled demo model\n"
        "  idefix -i vision-plain -m HuggingFaceTB/SmolVLM-256M-Instruct\n"
        "  idefix --port 1234 vision-plain -m MODEL\n"
        "  idefix run --image shapes.png 'How many circles are there?'\n\n"
        "`idefix COMMAND --help` lists a command's own flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"idefix {__version__}")
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", parser_class=Parser, prog="idefix"
    )
    plain = commands.add_parser("vision-plain", help="a vision model (mistral.rs syntax; with -i or --port)")
    _model_flags(plain)
    _answer_flags(plain, None)
    chat = commands.add_parser("chat", help="chat in the terminal (same as -i)")
    _model_flags(chat)
    _answer_flags(chat, None)
    serve = commands.add_parser("serve", help="serve the OpenAI API (same as --port, default 1234)")
    _model_flags(serve)
    # `idefix serve -m M --port 1234`: after the subcommand too; SUPPRESS keeps a global --port when not given here
    serve.add_argument("--port", type=int, default=argparse.SUPPRESS, help="port (default 1234; 0 = any free port)")
    serve.add_argument("--serve-ip", default=argparse.SUPPRESS, help="address to listen on (default 127.0.0.1)")
    run = commands.add_parser("run", help="answer one question and exit")
    _model_flags(run)
    _answer_flags(run, 256)
    run.add_argument("--image", action="append", default=[], metavar="SRC", help="image path, URL or data URI")
    run.add_argument("--json", action="store_true", help="print the whole response (text, usage) as JSON")
    run.add_argument("prompt", help="the question")
    quantize = commands.add_parser("quantize", help="quantize a model and write it as a UQFF folder")
    quantize.add_argument("-m", "--model-id", default=None, metavar="MODEL", help="model folder or hub repo id")
    quantize.add_argument("--isq", type=isq_type, required=True, metavar="TYPE", help="GGML type, e.g. Q4K or Q8_0")
    quantize.add_argument("-o", "--output", required=True, metavar="DIR", help="the UQFF folder to write")
    quantize.add_argument("--revision", default=None, metavar="REV", help="hub revision: branch, tag or commit")
    # The bench parses its own flags (`idefix bench --help`), so building this parser imports no torch.
    bench = commands.add_parser("bench", help="measure speed side by side with transformers", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    _global_flags(parser)  # after the commands, so --help lists the commands first
    return parser


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.cpu else ("cuda" if _cuda() else "cpu")


def _load_engine(args: argparse.Namespace) -> Engine:
    from idefix.config import EngineConfig
    from idefix.engine.engine import Engine
    from idefix.loading import load

    progress = sys.stderr.isatty()  # a progress bar for people; scripts read stderr for the one error line
    if progress:
        print(f"Loading {args.model_id or 'the demo model'} ...", file=sys.stderr, flush=True)
    token = read_token(args.token_source)
    # token False (`--token-source none`) is huggingface_hub's "send no token"; load() passes it through.
    loaded = load(
        args.model_id,
        revision=args.revision,
        token=token,  # type: ignore[arg-type]
        dtype=args.dtype,
        device=_device(args),
        progress=progress,
        isq=args.isq,
        from_uqff=args.from_uqff,
        write_uqff=args.write_uqff,
        num_device_layers=args.num_device_layers,
        topology=args.topology,
    )
    _check_arch(args.arch, loaded.path)
    logging.getLogger("idefix").info("loaded %s from %s", loaded.model_id, loaded.path)
    single = args.command == "run"
    interactive = not single and _wants_chat(args)
    config = EngineConfig(
        max_num_seqs=1 if single or interactive else args.max_seqs,
        max_model_len=args.max_seq_len,
        max_waiting=args.max_waiting,
        cache_slots=0 if single else 2 if interactive else 4,
        cuda_graphs=not args.no_cuda_graphs,
    )
    return Engine(loaded, config)


def _check_arch(arch: str | None, path: Path) -> None:
    """`-a` must agree with config.json's model_type when both are given."""
    if arch is None:
        return
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # load() has read it already; nothing more to say here
    if model_type is not None and model_type not in ARCHES[arch]:
        raise ModelLoadError(f"-a {arch} does not match config.json's model_type {model_type!r}; drop -a or fix it")


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
    outputs = stream(engine, messages, params)
    if args.json:
        completion = collect(outputs)
        usage = completion.usage
        usage_json = {
            **asdict(usage),
            "total_tokens": usage.total_tokens,
            "avg_prompt_tok_per_sec": usage.avg_prompt_tok_per_sec,
            "avg_compl_tok_per_sec": usage.avg_compl_tok_per_sec,
        }
        head = {"model": engine.loaded.model_id, "text": completion.text, "finish_reason": completion.finish_reason}
        print(json.dumps({**head, **asdict(completion), "usage": usage_json}))
        return
    for out in outputs:
        print(out.text, end="", flush=True)
    print()


def _quantize(args: argparse.Namespace) -> None:
    from idefix.loading import quantize_to_uqff

    start = time.perf_counter()
    types = quantize_to_uqff(args.model_id, args.isq, args.output, revision=args.revision, progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    print(f"wrote a {types} UQFF of {args.model_id or 'demo'} to {args.output} in {seconds:.1f} s")


def _serve(args: argparse.Namespace) -> None:
    from idefix.server.options import ServerOptions
    from idefix.server.serve import serve

    serve(lambda: _load_engine(args), ServerOptions.from_args(args, args.model_id or "demo"))


def _chat(args: argparse.Namespace) -> int:
    from idefix.chat import run_chat
    from idefix.chat_session import Settings

    start = time.perf_counter()
    engine = _load_engine(args)
    settings = Settings(max_tokens=args.max_tokens, seed=args.seed)
    model_id = args.model_id or "demo"
    return run_chat(engine, model_id, _device(args), settings, time.perf_counter() - start)


def _wants_chat(args: argparse.Namespace) -> bool:
    return args.command == "chat" or (args.interactive_mode and args.command in (None, "vision-plain"))


def _start_log(file: str | None) -> None:
    if file is None:
        return
    try:
        handler = logging.FileHandler(file)
    except OSError as exc:
        raise IdefixError(f"--log {file}: cannot open the log file ({exc.strerror})") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("idefix")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the bench has its own flags and help
        from idefix.bench.cli import run as run_bench

        return run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        _model_flags_defaults(parser, args)
    if args.interactive_mode and args.port is not None:
        parser.error("-i and --port exclude each other: chat in the terminal or serve, not both")
    try:
        _start_log(args.log)
        if args.command == "run":
            _run(args)
        elif args.command == "quantize":
            _quantize(args)
        elif _wants_chat(args):
            return _chat(args)
        elif args.command == "serve" or args.port is not None:
            _serve(args)
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
    _answer_flags(defaults, None)
    for key, value in vars(defaults.parse_args([])).items():
        setattr(args, key, value)


if __name__ == "__main__":
    sys.exit(main())
