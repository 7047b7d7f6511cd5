"""POST /v1/chat/completions: translate the request, hand it to the engine, translate the outputs back.

`ChatHandler.submit` does everything that can fail about a request (model name, image count, sampling fields,
fetching and decoding images, the chat template, context length, a full queue) before a single byte of the answer
is sent; `complete` folds the outputs into one `chat.completion`, `stream` turns them into SSE chunks. Leaving
either early (the client went away) aborts the request at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from idefix.engine.async_engine import AsyncEngine
from idefix.generate import collect
from idefix.request import RequestOutput, TokenLogprob, Usage
from idefix.sampling import SamplingParams, from_openai
from idefix.server import protocol as p
from idefix.server.errors import APIError, from_exception
from idefix.server.metrics import Metrics
from idefix.server.options import ServerOptions

PREPARE_THREADS = 32
"""Requests whose images are fetched and decoded at the same time (a slow image server holds one thread)."""


@dataclass
class Submitted:
    """A request the engine accepted: its outputs arrive on `queue` from the engine's loop thread."""

    id: str
    model: str
    params: SamplingParams
    queue: asyncio.Queue[RequestOutput | BaseException]
    engine: AsyncEngine
    created: int = field(default_factory=lambda: int(time.time()))
    arrival: float = field(default_factory=time.perf_counter)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.remaining = self.params.n

    async def next(self) -> RequestOutput:
        out = await self.queue.get()
        if isinstance(out, BaseException):
            self.remaining = 0  # the engine already dropped the request
            raise out
        self.remaining -= out.finished
        return out

    def close(self) -> bool:
        """Abort the request if it is still running; True when it was."""
        if self.remaining:
            self.remaining = 0
            self.engine.abort(self.id)
            return True
        return False


class ChatHandler:
    def __init__(self, engine: AsyncEngine, options: ServerOptions, metrics: Metrics) -> None:
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self.tokenizer = engine.engine.tokenizer
        self._threads = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="idefix-prepare")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: p.ChatCompletionRequest) -> Submitted:
        if request.model not in (self.options.model_name, "default"):
            message = f"the model {request.model!r} does not exist; this server runs {self.options.model_name!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        images, limit = request.num_images(), self.options.max_images_per_request
        if images > limit:
            raise APIError(400, f"the request has {images} images, allowed at most {limit}", param="messages")
        params = from_openai(**request.sampling_fields())
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(
            self._threads, self.engine.prepare, request.engine_messages(), self.options.media
        )
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(out: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        submitted = Submitted(request_id, request.model, params, queue, self.engine)
        await loop.run_in_executor(self._threads, self.engine.submit, prompt, params, sink, request_id)
        return submitted

    async def complete(self, sub: Submitted) -> p.ChatCompletion:
        outputs: list[RequestOutput] = []
        try:
            while sub.remaining:
                outputs.append(await sub.next())
        finally:
            if sub.close():
                self.metrics.aborted.inc()
        completion = collect(outputs, sub.params.n)
        self.metrics.finished(completion.usage, time.perf_counter() - sub.arrival)
        choices = [
            p.Choice(
                index=choice.index,
                message=p.AssistantMessage(content=choice.text),
                finish_reason=_finish_reason(choice.finish_reason),
                logprobs=self._logprobs(choice.logprobs),
            )
            for choice in completion.choices
        ]
        return p.ChatCompletion(
            id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=usage_info(completion.usage)
        )

    async def stream(self, sub: Submitted, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE events: a role delta per choice, content deltas, a finish_reason per choice, the usage chunk if
        asked, then `[DONE]`. An engine failure after the first byte becomes an `error` event."""
        usage: Usage | None = None
        try:
            for index in range(sub.params.n):
                yield self._chunk(sub, [p.ChunkChoice(index=index, delta=p.Delta(role="assistant", content=""))])
            while sub.remaining:
                out = await sub.next()
                usage = out.usage
                if out.text or out.logprobs:
                    delta = p.Delta(content=out.text)
                    choice = p.ChunkChoice(index=out.index, delta=delta, logprobs=self._logprobs(out.logprobs))
                    yield self._chunk(sub, [choice])
                if out.finished:
                    finish = _finish_reason(out.finish_reason)
                    yield self._chunk(sub, [p.ChunkChoice(index=out.index, delta=p.Delta(), finish_reason=finish)])
            if usage is not None:
                self.metrics.finished(usage, time.perf_counter() - sub.arrival)
                if include_usage:
                    yield self._chunk(sub, [], usage_info(usage))
        except Exception as exc:  # the engine failed under a running request: tell the client in-band
            yield _sse(from_exception(exc).body())
        finally:
            if sub.close():
                self.metrics.aborted.inc()
        yield b"data: [DONE]\n\n"

    def _chunk(self, sub: Submitted, choices: list[p.ChunkChoice], usage: p.UsageInfo | None = None) -> bytes:
        chunk = p.ChatCompletionChunk(id=sub.id, created=sub.created, model=sub.model, choices=choices, usage=usage)
        return b"data: " + chunk.model_dump_json().encode() + b"\n\n"

    def _logprobs(self, logprobs: list[TokenLogprob] | None) -> p.ChoiceLogprobs | None:
        if logprobs is None:
            return None
        return p.ChoiceLogprobs(
            content=[
                p.TokenLogprobOut(
                    **self._token(item.token_id, item.logprob).model_dump(),
                    top_logprobs=[self._token(token, value) for token, value in item.top],
                )
                for item in logprobs
            ]
        )

    def _token(self, token_id: int, logprob: float) -> p.TopLogprob:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return p.TopLogprob(token=text, logprob=max(logprob, -9999.0), bytes=list(text.encode()))


def usage_info(usage: Usage) -> p.UsageInfo:
    return p.UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
        avg_tok_per_sec=usage.avg_tok_per_sec,
        avg_prompt_tok_per_sec=usage.avg_prompt_tok_per_sec,
        avg_compl_tok_per_sec=usage.avg_compl_tok_per_sec,
        total_time_sec=usage.total_time_sec,
        total_prompt_time_sec=usage.total_prompt_time_sec,
        total_completion_time_sec=usage.total_completion_time_sec,
    )


def _finish_reason(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else ("stop" if reason else None)


def _sse(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
