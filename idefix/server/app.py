"""The FastAPI application: routes, API-key check, request-body cap, CORS and request counting.

    POST /v1/chat/completions   chat completions, streaming or not (see `idefix.server.chat`)
    GET  /v1/models             the served model ("default" is accepted as its alias in requests)
    GET  /health                200 once the model is loaded and until shutdown begins, 503 otherwise
    GET  /metrics               Prometheus text format (see `idefix.server.metrics`)

The app is built around an `AsyncEngine` whose model is already loaded; it never loads or shuts down the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idefix import __version__
from idefix.engine.async_engine import AsyncEngine
from idefix.server import errors
from idefix.server.chat import ChatHandler
from idefix.server.errors import APIError
from idefix.server.metrics import Metrics
from idefix.server.options import ServerOptions
from idefix.server.protocol import ChatCompletionRequest, ModelCard, ModelList

T = TypeVar("T")
ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


def create_app(engine: AsyncEngine, options: ServerOptions) -> FastAPI:
    metrics = Metrics(engine.engine)
    handler = ChatHandler(engine, options, metrics)
    created = int(time.time())
    ready = {"value": True}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ready["value"] = False
        handler.close()

    app = FastAPI(title="idefix", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    if options.cors_allow_origins:
        app.add_middleware(
            OpenAICORS, allow_origins=list(options.cors_allow_origins), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(CountRequests, counter=metrics.requests)

    def check_key(request: Request) -> None:
        if options.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            message = "invalid or missing API key: send the header 'Authorization: Bearer <key>'"
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not ready["value"]:
            return APIError(503, "shutting down", type="server_error", code="unavailable").response()
        return JSONResponse({"status": "ok", "model": options.model_name})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return ModelList(data=[ModelCard(id=options.model_name, created=created)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        chat = ChatCompletionRequest.parse(await read_body(request, options.max_body_bytes))
        submitted = await handler.submit(chat)
        if chat.stream:
            include_usage = chat.stream_options is not None and chat.stream_options.include_usage
            return EventStream(handler.stream(submitted, include_usage))
        completion = await until_disconnect(request, handler.complete(submitted))
        if completion is None:
            return Response(status_code=499)  # nobody reads it; the request was aborted
        return JSONResponse(completion.model_dump(exclude_none=True))

    return app


class OpenAICORS(CORSMiddleware):
    """Starlette's CORS middleware, with its preflight refusals (plain-text 400s) answered as OpenAI error JSON."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode()  # "Disallowed CORS origin, method"
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}
        message = f"CORS preflight refused: {reason[0].lower()}{reason[1:]}"
        return APIError(400, message, code="cors_refused", headers=headers).response()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes (Content-Length is not trusted)."""
    too_large = APIError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large", headers={"Connection": "close"}
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client disconnects first (then `work` is cancelled and None returned)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return None


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, so a client that went away aborts its request."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


class CountRequests:
    """Counts every HTTP answer by route and status (unknown paths share the route label "other")."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = "500"

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.counter.labels(route, status).inc()
