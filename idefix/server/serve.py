"""Run the server: one AsyncEngine for the process, uvicorn on a socket we bind ourselves, a graceful exit.

SIGTERM / Ctrl-C: uvicorn stops accepting, lets in-flight requests finish (at most `shutdown_grace` seconds,
then cancels them), runs the app's shutdown; then the engine loop stops and `serve` returns normally (exit 0).
"""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from idefix.engine.async_engine import AsyncEngine
from idefix.engine.engine import Engine
from idefix.errors import IdefixError
from idefix.server.app import create_app
from idefix.server.options import ServerOptions


def serve(load: Callable[[], Engine], options: ServerOptions) -> None:
    """Bind the address (an IdefixError if it is taken, before a minute of loading is wasted), `load()` the
    engine, then serve it until SIGTERM / SIGINT. Connections are refused until the model is loaded."""
    sock = _bind(options.host, options.port)
    try:
        engine = load()
    except BaseException:
        sock.close()
        raise
    if options.seed is not None:
        import torch

        torch.manual_seed(options.seed)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine, options)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=options.shutdown_grace,  # type: ignore[arg-type]  # a float works
        lifespan="on",
    )
    server = uvicorn.Server(config)
    print(_banner(engine, options, sock), flush=True)
    # uvicorn re-raises the signal it handled once it has shut down; these handlers make that a no-op.
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        async_engine.shutdown()
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("idefix server stopped", file=sys.stderr, flush=True)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise IdefixError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --serve-ip") from None
    sock.set_inheritable(True)
    return sock


def _banner(engine: Engine, options: ServerOptions, sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    model = engine.loaded.model
    lines = [
        f"idefix: serving the OpenAI API at http://{shown}:{port}/v1",
        f"  model         {options.model_name}  ({engine.loaded.path})",
        f"  quantization  {engine.loaded.quantization}",
        f"  device        {model.device}  dtype {str(model.dtype).removeprefix('torch.')}",
        f"  engine        {engine.config.max_num_seqs} sequences, context {engine.max_model_len} tokens, "
        f"{engine.config.max_waiting} waiting before 503",
        f"  auth          {'Bearer API key required' if options.api_key else 'none (no --api-key)'}",
    ]
    return "\n".join(lines)


def _ignore(sig: int, frame: FrameType | None) -> None:
    """Stands in after uvicorn's own handler is gone: the shutdown it asked for has already happened."""
