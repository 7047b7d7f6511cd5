"""AsyncEngine: many concurrent streams through one step loop, aborts, errors in the caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from idefix.config import EngineConfig
from idefix.engine.async_engine import AsyncEngine
from idefix.engine.engine import Engine
from idefix.errors import ContextLengthError
from idefix.generate import generate
from idefix.loading import LoadedModel, load
from idefix.sampling import SamplingParams
from tests.unit.test_engine import _messages


@pytest.fixture(scope="module")
def loaded(small_checkpoint: Path) -> LoadedModel:
    return load(str(small_checkpoint), progress=False)


def test_concurrent_streams_equal_requests_alone(loaded: LoadedModel) -> None:
    params = [SamplingParams(temperature=0, max_tokens=5 + i % 7) for i in range(16)]
    solo = Engine(loaded, EngineConfig(max_num_seqs=1, cache_slots=0))
    alone = [generate(solo, _messages(i % 6), params[i]).token_ids for i in range(16)]
    engine = AsyncEngine(Engine(loaded, EngineConfig(max_num_seqs=16, max_num_batched_tokens=64)))

    async def one(i: int) -> list[int]:
        return [t async for out in engine.stream(_messages(i % 6), params[i]) for t in out.token_ids]

    async def all_of_them() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(16)))

    try:
        assert asyncio.run(all_of_them()) == alone
    finally:
        engine.shutdown()


def test_leaving_a_stream_aborts_the_request(loaded: LoadedModel) -> None:
    engine = AsyncEngine(Engine(loaded, EngineConfig(max_num_seqs=4)))

    async def leave_early() -> None:
        async for _ in engine.stream(_messages(1), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)):
            break

    try:
        for _ in range(4):
            asyncio.run(leave_early())
        asyncio.run(asyncio.sleep(0.2))
        prompt = engine.prepare(_messages(0))
        assert list(engine.stream_sync(prompt, SamplingParams(temperature=0, max_tokens=2)))
        assert engine.engine.pool.num_running == 0 and not engine.engine.requests
    finally:
        engine.shutdown()


def test_request_errors_reach_the_caller(loaded: LoadedModel) -> None:
    engine = AsyncEngine(Engine(loaded, EngineConfig(max_model_len=32)))
    try:
        with pytest.raises(ContextLengthError):
            list(engine.stream_sync(engine.engine.text_prompt([5] * 40), SamplingParams()))
        assert list(engine.stream_sync(engine.engine.text_prompt([5] * 4), SamplingParams(max_tokens=2)))
    finally:
        engine.shutdown()


def test_choices_finishing_in_the_same_step_all_arrive(loaded: LoadedModel) -> None:
    engine = AsyncEngine(Engine(loaded))
    try:
        prompt = engine.prepare(_messages(1))
        outputs = list(engine.stream_sync(prompt, SamplingParams(temperature=0, max_tokens=3, n=3)))
        assert sorted({out.index for out in outputs if out.finished}) == [0, 1, 2]
    finally:
        engine.shutdown()
