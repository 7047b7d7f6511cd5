"""AsyncEngine: runs the engine's step loop on its own thread and streams outputs to many callers.

Callers never touch the engine directly: requests and aborts are handed to the loop thread as commands
and applied between steps; outputs travel back through a per-request sink (an asyncio queue for
`stream`, a thread-safe queue for `stream_sync`). Preparing a prompt (fetching and decoding images)
happens in the caller's thread or a worker thread, never on the loop thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from idefix.engine.engine import Engine
from idefix.errors import IdefixError
from idefix.media import MediaPolicy
from idefix.request import PreparedPrompt, RequestOutput
from idefix.sampling import SamplingParams

Sink = Callable[[RequestOutput | BaseException], None]


class EngineDeadError(IdefixError):
    """The engine loop has stopped; no request can run."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="idefix-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ callers

    def prepare(self, messages: object, policy: MediaPolicy | None = None) -> PreparedPrompt:
        return self.engine.prepare(messages, policy)

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, sink: Sink, request_id: str | None = None) -> str:
        """Queue a request on the loop thread; errors of `Engine.add` are raised here, in the caller."""
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        accepted: Future[str] = Future()

        def add() -> None:
            try:
                rid = self.engine.add(prompt, params, request_id)
            except BaseException as exc:  # handed back to the caller
                accepted.set_exception(exc)
                return
            self._sinks[rid] = sink
            accepted.set_result(rid)

        self._command(add)
        while True:
            try:
                return accepted.result(timeout=1.0)
            except FutureTimeout:
                if not self._thread.is_alive():
                    raise EngineDeadError("the engine loop stopped before taking the request") from None

    def abort(self, request_id: str) -> None:
        def abort() -> None:
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

        self._command(abort)

    async def stream(
        self, messages: object, params: SamplingParams, policy: MediaPolicy | None = None, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; leaving the iteration early (a client went away) aborts it."""
        prompt = await asyncio.to_thread(self.prepare, messages, policy)
        async for out in self.stream_prepared(prompt, params, request_id):
            yield out

    async def stream_prepared(
        self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(out: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, out)

        rid = await asyncio.to_thread(self.submit, prompt, params, sink, request_id)
        async for out in self._drain(rid, params.n, outputs.get):
            yield out

    async def _drain(self, rid: str, choices: int, get: Callable) -> AsyncIterator[RequestOutput]:
        remaining = choices
        try:
            while remaining:
                out = await get()
                if isinstance(out, BaseException):
                    raise out
                remaining -= out.finished
                yield out
        finally:
            if remaining:
                self.abort(rid)

    def stream_sync(
        self, prompt: PreparedPrompt, params: SamplingParams, request_id: str | None = None
    ) -> Iterator[RequestOutput]:
        """The blocking twin of `stream_prepared`, for threads without an event loop."""
        outputs: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        rid = self.submit(prompt, params, outputs.put, request_id)
        remaining = params.n
        try:
            while remaining:
                out = outputs.get()
                if isinstance(out, BaseException):
                    raise out
                remaining -= out.finished
                yield out
        finally:
            if remaining:
                self.abort(rid)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop thread; requests still running end with an EngineDeadError."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ loop thread

    def _command(self, command: Callable[[], None]) -> None:
        if not self._thread.is_alive():
            raise EngineDeadError("the engine loop is not running")
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            while not self._commands.empty():
                self._commands.get()()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or out of memory: fail the running requests, keep serving
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            for out in outputs:  # after delivering: choices of one request may finish in the same step
                if out.finished and out.request_id not in self.engine.requests:
                    self._sinks.pop(out.request_id, None)
        self._fail_all(EngineDeadError("the engine shut down"))

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        sink = self._sinks.get(request_id)
        if sink is None:
            return
        try:
            sink(item)
        except Exception:  # the caller is gone (its event loop closed): nobody reads this request any more
            self._sinks.pop(request_id, None)
            self.engine.abort(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self._sinks):
            self._deliver(rid, exc)
            self.engine.abort(rid)
        self._sinks.clear()
