"""Blocking, single-caller generation on an `Engine` (the one-shot CLI, scripts, tests).

For many concurrent callers use `idefix.engine.async_engine.AsyncEngine`, which owns the step loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from idefix.engine.engine import Engine
from idefix.media import MediaPolicy
from idefix.request import RequestOutput, Usage
from idefix.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Generation:
    """text: the answer; token_ids: its tokens (a stop token excluded); finish_reason: "stop" | "length"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage


def stream(
    engine: Engine, messages: object, params: SamplingParams = GREEDY, policy: MediaPolicy | None = None
) -> Iterator[RequestOutput]:
    """Outputs of one request (choice 0 and any others), stepping the engine until it is done."""
    request_id = engine.add(engine.prepare(messages, policy), params)
    try:
        while request_id in engine.requests:
            yield from (out for out in engine.step() if out.request_id == request_id)
    finally:
        engine.abort(request_id)


def generate(
    engine: Engine, messages: object, params: SamplingParams = GREEDY, policy: MediaPolicy | None = None
) -> Generation:
    """The answer (choice 0) to OpenAI-style `messages`; greedy unless `params` say otherwise."""
    text, tokens, reason, usage = "", [], "length", Usage()
    for out in stream(engine, messages, params, policy):
        if out.index != 0:
            continue
        text += out.text
        tokens += out.token_ids
        usage = out.usage
        if out.finished:
            reason = out.finish_reason or reason
    return Generation(text, tokens, reason, usage)
