"""`Runner`: load a model once and answer chat completion requests through the continuous-batching engine.

A thin front end: it translates `ChatCompletionRequest`s into `SamplingParams` + messages, hands them to one
`AsyncEngine` (whose loop thread batches every request in flight, from any thread or event loop) and turns
the engine's outputs into typed responses.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator, Mapping, Sequence
from typing import Any

import torch

from idefix import __version__
from idefix.api.load_options import hub_token, load_options
from idefix.api.messages import VisionMessages
from idefix.api.options import IsqType, ModelDType, VisionPlain
from idefix.api.responses import ResponseFactory
from idefix.api.types import ChatCompletionChunkResponse, ChatCompletionRequest, ChatCompletionResponse
from idefix.config import EngineConfig
from idefix.engine.async_engine import AsyncEngine, EngineDeadError
from idefix.engine.engine import Engine
from idefix.errors import InvalidRequestError
from idefix.generate import collect
from idefix.loading import load
from idefix.media import MediaPolicy
from idefix.processing.prompt import encode_prompt
from idefix.request import PreparedPrompt, RequestOutput
from idefix.sampling import SamplingParams, from_openai

logger = logging.getLogger("idefix")

Messages = Sequence[Mapping[str, Any]] | VisionMessages | str


class Runner:
    """A loaded model answering chat completion requests, as mistralrs's `Runner` does.

        runner = Runner(which=Which.VisionPlain(model_id="HuggingFaceTB/SmolVLM-256M-Instruct",
                                                arch=VisionArchitecture.Idefics3))
        res = runner.send_chat_completion_request(ChatCompletionRequest(model="default", messages=[...]))

    Arguments after `max_seqs` are keyword-only (mistralrs's positions differ).
    which: the model (`Which.VisionPlain`). max_seqs: sequences decoded together. prefix_cache_n: finished
    conversations kept for prefix reuse (default 4). token_source: hub token, "cache" (huggingface_hub's
    own: HF_TOKEN or the cached login), "env:VAR", "literal:TOKEN", "path:FILE" or "none" (idefix passes no
    token; huggingface_hub may still use its own). seed: seed of every request that gives none (reproducible
    sampling). in_situ_quant: quantize while loading (an `IsqType` or its name, e.g. "Q4K", "8"); from_uqff:
    pre-quantized UQFF file(s); num_device_layers: a device map (["0:16", "1:16"], mistral.rs syntax).
    idefix's own: max_model_len (context per sequence,
    default 4096, None = the model's), device (default: CUDA when present, else CPU), media_policy (what
    image URLs / paths requests may name; default `MediaPolicy.trusted()`: any file, any URL, since a
    program is its user's own process; pass `MediaPolicy()` for the server's restrictions when the input
    is untrusted), progress (show loading progress).

    Loading errors raise `ModelLoadError`; bad arguments `InvalidRequestError`. Thread-safe: many threads
    and event loops may send requests at once; they are batched together. `close()` (or `with Runner(...)`)
    stops the engine thread and frees the model.
    """

    def __init__(
        self,
        which: VisionPlain,
        max_seqs: int = 16,
        *,
        prefix_cache_n: int | None = None,
        token_source: str = "cache",
        num_device_layers: list[str] | None = None,
        in_situ_quant: IsqType | str | None = None,
        from_uqff: str | list[str] | None = None,
        seed: int | None = None,
        max_model_len: int | None = 4096,
        device: str | None = None,
        media_policy: MediaPolicy | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(which, VisionPlain):
            raise InvalidRequestError(f"which must be Which.VisionPlain(...), got {type(which).__name__}")
        options = load_options(which, in_situ_quant, from_uqff, num_device_layers)
        cache_slots = 4 if prefix_cache_n is None else prefix_cache_n
        config = EngineConfig(max_num_seqs=max_seqs, max_model_len=max_model_len, cache_slots=cache_slots)
        self.seed = from_openai(seed=seed).seed  # validated like a request's seed
        self.media_policy = media_policy if media_policy is not None else MediaPolicy.trusted()
        start = time.perf_counter()
        loaded = load(
            which.model_id,
            revision=which.revision,
            token=hub_token(token_source),
            dtype=ModelDType.parse(which.dtype).value,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            progress=progress,
            **options,
        )
        self.model_id = loaded.model_id
        """The model id as given (the responses' `model`)."""
        self._engine: AsyncEngine | None = AsyncEngine(Engine(loaded, config))
        self._finalizer = weakref.finalize(self, self._engine.shutdown)  # a forgotten Runner still stops its thread
        logger.info("idefix %s: loaded %s in %.1f s", __version__, loaded.model_id, time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------ mistralrs API

    def send_chat_completion_request(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | Iterator[ChatCompletionChunkResponse]:
        """The response to `request`, or with `request.stream` an iterator of chunks. Errors (bad parameter,
        bad image, prompt too long, queue full) are raised here, before anything is generated; leaving a
        stream early stops its generation."""
        messages, params = self._translate(request)
        if request.stream:
            return self._stream(messages, params)
        return self._complete(messages, params)

    async def send_chat_completion_request_async(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunkResponse]:
        """The asyncio twin: `await` it for the response, or with `request.stream` for an async iterator of
        chunks. Concurrent requests (`asyncio.gather`) run batched together."""
        messages, params = self._translate(request)
        if not request.stream:
            return await self._complete_async(messages, params)
        chunks = self._stream_async(messages, params)
        first = await anext(chunks)  # the engine's errors surface here, in the await
        return _prepend(first, chunks)

    def max_sequence_length(self) -> int:
        """Tokens one sequence may hold (prompt + answer)."""
        return self._live().engine.max_model_len

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop the engine thread and free the model's memory. Requests still running end with
        `EngineDeadError`, and so does any later request. Calling it again does nothing."""
        if self._engine is None:
            return
        self._engine = None
        self._finalizer()  # runs AsyncEngine.shutdown once and drops the finalizer's reference to it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def closed(self) -> bool:
        """True once `close()` ran."""
        return self._engine is None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ shared with VisionModel

    def _translate(self, request: ChatCompletionRequest) -> tuple[Messages, SamplingParams]:
        if not isinstance(request, ChatCompletionRequest):
            raise InvalidRequestError(f"expected a ChatCompletionRequest, got {type(request).__name__}")
        return request.messages, self._sampling(request.sampling_fields())

    def _sampling(self, fields: dict[str, Any]) -> SamplingParams:
        if fields.get("seed") is None:
            fields = {**fields, "seed": self.seed}
        return from_openai(**fields)

    def _complete(self, messages: Messages, params: SamplingParams) -> ChatCompletionResponse:
        engine = self._live()
        prompt = self._prepare(engine, messages)
        factory = self._factory(engine)
        return factory.response(collect(engine.stream_sync(prompt, params, factory.id), params.n))

    def _stream(self, messages: Messages, params: SamplingParams) -> Iterator[ChatCompletionChunkResponse]:
        engine = self._live()
        prompt = self._prepare(engine, messages)
        factory = self._factory(engine)
        outputs = engine.stream_sync(prompt, params, factory.id)
        first = next(outputs)  # submits the request: the engine's errors surface in the call, not mid-iteration
        return _chunks(factory, first, outputs, params.n)

    async def _complete_async(self, messages: Messages, params: SamplingParams) -> ChatCompletionResponse:
        engine = self._live()
        prompt = await asyncio.to_thread(self._prepare, engine, messages)
        factory = self._factory(engine)
        outputs = [out async for out in engine.stream_prepared(prompt, params, factory.id)]
        return factory.response(collect(outputs, params.n))

    async def _stream_async(
        self, messages: Messages, params: SamplingParams
    ) -> AsyncGenerator[ChatCompletionChunkResponse, None]:
        engine = self._live()
        prompt = await asyncio.to_thread(self._prepare, engine, messages)
        factory = self._factory(engine)
        remaining = params.n
        async for out in engine.stream_prepared(prompt, params, factory.id):
            remaining -= out.finished
            yield factory.chunk(out, last=not remaining)

    # ------------------------------------------------------------------------------------------ helpers

    def _live(self) -> AsyncEngine:
        if self._engine is None:
            raise EngineDeadError("this Runner is closed")
        return self._engine

    def _factory(self, engine: AsyncEngine) -> ResponseFactory:
        return ResponseFactory(f"chatcmpl-{uuid.uuid4().hex}", self.model_id, engine.engine.tokenizer)

    def _prepare(self, engine: AsyncEngine, messages: Messages) -> PreparedPrompt:
        if isinstance(messages, VisionMessages):
            messages = messages.messages
        if not isinstance(messages, str):
            return engine.prepare(messages, self.media_policy)
        if not messages.strip():
            raise InvalidRequestError("the prompt is empty")
        ids = encode_prompt(engine.engine.tokenizer, messages)
        prompt = engine.engine.text_prompt(ids)
        if prompt.image_token_id in ids:
            raise InvalidRequestError("a prompt string cannot hold <image> tokens; send messages with image parts")
        return prompt


def _chunks(
    factory: ResponseFactory, first: RequestOutput, outputs: Iterator[RequestOutput], n: int
) -> Generator[ChatCompletionChunkResponse, None, None]:
    remaining = n - first.finished
    try:
        yield factory.chunk(first, last=not remaining)
        for out in outputs:
            remaining -= out.finished
            yield factory.chunk(out, last=not remaining)
    finally:
        close = getattr(outputs, "close", None)
        if close is not None:
            close()  # leaving early aborts the request


async def _prepend(
    first: ChatCompletionChunkResponse, rest: AsyncGenerator[ChatCompletionChunkResponse, None]
) -> AsyncGenerator[ChatCompletionChunkResponse, None]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()
