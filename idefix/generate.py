"""Blocking, single-caller generation on an `Engine`, and collecting a request's outputs into a
`Completion` (used by the one-shot CLI, the Python API and the server's non-streaming answers).

For many concurrent callers use `idefix.engine.async_engine.AsyncEngine`, which owns the step loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from idefix.engine.engine import Engine
from idefix.media import MediaPolicy
from idefix.request import RequestOutput, TokenLogprob, Usage
from idefix.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@dataclass
class Choice:
    """One completion: its text, tokens (a stop token excluded), finish_reason and per-token logprobs."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Completion:
    """Every choice of a request, in index order, and the request's usage."""

    choices: list[Choice]
    usage: Usage

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason


def collect(outputs: Iterable[RequestOutput], n: int = 1) -> Completion:
    """Fold a request's stream of outputs into its Completion."""
    choices = [Choice(index) for index in range(n)]
    usage = Usage()
    for out in outputs:
        choice = choices[out.index]
        choice.text += out.text
        choice.token_ids += out.token_ids
        if out.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + out.logprobs
        if out.finished:
            choice.finish_reason = out.finish_reason
        usage = out.usage
    return Completion(choices, usage)


def stream(
    engine: Engine, messages: object, params: SamplingParams = GREEDY, policy: MediaPolicy | None = None
) -> Iterator[RequestOutput]:
    """Outputs of one request (every choice), stepping the engine until it is done."""
    request_id = engine.add(engine.prepare(messages, policy), params)
    try:
        while request_id in engine.requests:
            yield from (out for out in engine.step() if out.request_id == request_id)
    finally:
        engine.abort(request_id)


def generate(
    engine: Engine, messages: object, params: SamplingParams = GREEDY, policy: MediaPolicy | None = None
) -> Completion:
    """The answer to OpenAI-style `messages`; greedy unless `params` say otherwise."""
    return collect(stream(engine, messages, params, policy), params.n)
