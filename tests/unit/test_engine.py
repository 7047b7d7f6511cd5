"""The engine on a generated checkpoint: batching never changes greedy answers, caches reuse work,
resources come back, and bad requests fail before any work."""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.engine.graphs import DecodeGraphs
from idefix.engine.scheduler import StepPlan
from idefix.errors import ContextLengthError, OverloadedError
from idefix.generate import generate
from idefix.loading import LoadedModel, load
from idefix.request import RequestOutput
from idefix.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def loaded(small_checkpoint: Path) -> LoadedModel:
    return load(str(small_checkpoint), progress=False)


def _image(seed: int, size: tuple[int, int] = (90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _messages(i: int) -> list[dict]:
    content: list[dict] = [{"type": "image", "image": _image(i, (60 + 20 * i, 50))} for _ in range(i % 3)]
    text = "Describe this please. " * (1 + i % 4) + f"Case {i}."
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def _run_all(engine: Engine, requests: list[tuple[list[dict], SamplingParams]]) -> list[list[int]]:
    ids = [engine.add(engine.prepare(messages), params) for messages, params in requests]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[rid] for rid in ids]


def _alone(loaded: LoadedModel, messages: list[dict], params: SamplingParams) -> list[int]:
    return generate(Engine(loaded, EngineConfig(max_num_seqs=1, cache_slots=0)), messages, params).token_ids


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_batched_greedy_equals_alone(loaded: LoadedModel, prefix_caching: bool) -> None:
    requests = [(_messages(i), SamplingParams(temperature=0, max_tokens=6 + 3 * i)) for i in range(8)]
    alone = [_alone(loaded, messages, params) for messages, params in requests]
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=48, enable_prefix_caching=prefix_caching)
    assert _run_all(Engine(loaded, config), requests) == alone


def test_decode_graph_steps_equal_eager_ones(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The static-buffer step that CUDA graphs record (run eagerly here, on the CPU): same greedy tokens, over
    contiguous slots and context buckets; the other steps stay eager."""
    requests = [(_messages(i), SamplingParams(temperature=0, max_tokens=6 + 3 * i)) for i in range(6)]
    alone = [_alone(loaded, messages, params) for messages, params in requests]
    engine = Engine(loaded, EngineConfig(max_num_seqs=6, max_num_batched_tokens=48))
    assert engine.runner.graphs is None  # CUDA only
    engine.runner.graphs = graphs = DecodeGraphs(loaded.model, engine.cache, record=False)
    keys: list[int] = []
    bucket = graphs.bucket
    monkeypatch.setattr(graphs, "bucket", lambda context: keys.append(context) or bucket(context))
    assert _run_all(engine, requests) == alone
    assert len(keys) >= 10  # the decode-only steps took the graph path (20 of them here)


def test_chunked_prefill_keeps_others_decoding(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_num_batched_tokens=16))
    plans: list[StepPlan] = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan: plans.append(plan) or execute(plan)  # type: ignore[method-assign]
    short = engine.add(engine.prepare(_messages(0)), SamplingParams(temperature=0, max_tokens=60))
    while not any(seq.output_ids for seq in engine.requests[short]):
        engine.step()
    long = engine.add(engine.prepare(_messages(2)), GREEDY)  # two images: a prompt of many chunks
    plans.clear()
    while not any(seq.output_ids for seq in engine.requests[long]):
        engine.step()
    assert all(plan.num_tokens <= 16 for plan in plans)
    assert len(plans) >= 4
    assert all(len(plan.decodes) == 1 and plan.prefills for plan in plans)  # the short answer never waits


def test_second_turn_prefills_only_new_tokens(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_num_seqs=2))
    turn1 = _messages(1)
    first = generate(engine, turn1, GREEDY)
    turn2 = [*turn1, {"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = generate(engine, turn2, GREEDY)
    prompt2 = engine.prepare(turn2).token_ids
    assert second.usage.prompt_tokens == len(prompt2)
    assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens
    cold = Engine(loaded, EngineConfig(max_num_seqs=2, enable_prefix_caching=False))
    uncached = generate(cold, turn2, GREEDY)
    assert uncached.usage.cached_prompt_tokens == 0
    assert second.token_ids == uncached.token_ids


def test_image_features_are_cached_by_content(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(enable_prefix_caching=False))
    generate(engine, _messages(2), GREEDY)
    misses = engine.image_cache.misses
    again = _messages(2)  # same pixels, new PIL objects
    generate(engine, again, GREEDY)
    assert engine.image_cache.misses == misses and engine.image_cache.hits >= 2


def test_n_choices_share_the_prompt_and_seeds_reproduce(loaded: LoadedModel) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, n=3, seed=42)
    engine = Engine(loaded, EngineConfig(max_num_seqs=4))
    rid = engine.add(engine.prepare(_messages(1)), params)
    choices: dict[int, list[int]] = {0: [], 1: [], 2: []}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                choices[out.index] += out.token_ids
    assert len({tuple(tokens) for tokens in choices.values()}) > 1  # different seeds per choice
    crowded = Engine(loaded, EngineConfig(max_num_seqs=8))
    others = [(_messages(i), SamplingParams(temperature=0.8, max_tokens=8, seed=i)) for i in range(3, 6)]
    again = _run_all(crowded, [*others, (_messages(1), SamplingParams(temperature=1.0, max_tokens=10, seed=42))])
    assert again[-1] == choices[0]


def test_add_abort_cycles_and_mixed_load_release_everything(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_num_seqs=4, max_waiting=1000))
    prompt = engine.prepare(_messages(1))
    for i in range(1000):
        rid = engine.add(prompt, GREEDY)
        if i % 3 == 0:
            engine.step()
        engine.abort(rid)
    assert engine.pool.num_running == 0 and not engine.scheduler.waiting and not engine.requests
    params = [SamplingParams(temperature=t, max_tokens=3 + i % 5, seed=i) for i, t in enumerate([0.0, 0.7] * 100)]
    _run_all(engine, [(_messages(i % 6), params[i]) for i in range(20)])  # warm-up
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for start in range(0, 200, 20):
        _run_all(engine, [(_messages(i % 6), params[i]) for i in range(start, start + 20)])
    gc.collect()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert engine.pool.num_running == 0 and not engine.scheduler.running and not engine.requests
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB over 200 requests"


def test_context_and_queue_limits_fail_before_work(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_num_seqs=1, max_waiting=1, max_model_len=64))
    long_prompt = engine.text_prompt([5] * 64)
    with pytest.raises(ContextLengthError, match="64 tokens but the context is 64"):
        engine.add(long_prompt, GREEDY)
    with pytest.raises(ContextLengthError, match="ask for at most 4 tokens"):
        engine.add(engine.text_prompt([5] * 60), SamplingParams(max_tokens=10))
    clipped = engine.add(engine.text_prompt([5] * 60), SamplingParams(temperature=0))
    assert engine.requests[clipped][0].max_tokens == 4
    engine.add(engine.text_prompt([5] * 10), GREEDY)
    with pytest.raises(OverloadedError, match="busy"):
        engine.add(engine.text_prompt([5] * 10), GREEDY)


def test_stop_strings_and_logprobs_through_the_engine(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    plain = generate(engine, _messages(1), SamplingParams(temperature=0, max_tokens=12))
    assert len(plain.text) > 4
    stop = plain.text[2:4]
    stopped = generate(engine, _messages(1), SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    assert stopped.finish_reason == "stop" and stop not in stopped.text and plain.text.startswith(stopped.text)
    outputs: list[RequestOutput] = []
    rid = engine.add(
        engine.prepare(_messages(1)), SamplingParams(temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    )
    while engine.has_unfinished():
        outputs += [out for out in engine.step() if out.request_id == rid]
    entries = [entry for out in outputs for entry in out.logprobs or []]
    assert len(entries) == 4
    for entry in entries:
        assert entry.top[0][0] == entry.token_id and entry.logprob == pytest.approx(entry.top[0][1])
        assert [value for _, value in entry.top] == sorted((value for _, value in entry.top), reverse=True)
