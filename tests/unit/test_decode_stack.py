"""The native decode stack (native.DecodeStack: every decoder layer of a decode step in one call) against the same
layers run one by one in PyTorch: the hidden states it returns and the K/V it writes."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from idefix import native
from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load
from idefix.model.attention import AttentionBatch, DecodeGroup, KVCache
from idefix.model.idefics3 import Idefics3Model
from idefix.sampling import SamplingParams
from tests.checkpoints import WIDE, build_checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="the native kernels are not built for this CPU")

PROMPT = 9  # tokens already cached in each slot before the decode step


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(WIDE, tmp_path_factory.mktemp("wide") / "model")


@pytest.fixture(scope="module")
def wide_bf16(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checkpoint stored in bf16: run in fp32, its text products stay bf16 (Bf16Linear)."""
    folder = tmp_path_factory.mktemp("wide-bf16") / "model"
    shutil.copytree(wide, folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: t.to(torch.bfloat16) for name, t in weights.items()}, folder / "model.safetensors")
    return folder


def copy_cache(cache: KVCache) -> KVCache:
    twin = KVCache(len(cache.k), cache.num_slots, 1, 1, 1, torch.float32)
    twin.k, twin.v = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
    return twin


def decode_both_ways(model: Idefics3Model, rows: int) -> tuple[torch.Tensor, torch.Tensor, KVCache, KVCache]:
    """One decode step of `rows` sequences in slots 1 .. rows (each PROMPT tokens in), through the model (the stack)
    and through its layers one by one on a copy of the cache: (stacked, layered, stacked cache, layered cache)."""
    gen = torch.Generator().manual_seed(rows)
    vocab = model.config.text.vocab_size
    cache = model.new_cache(rows + 2, 32)
    with torch.inference_mode():
        for slot in range(1, rows + 1):
            ids = torch.randint(0, vocab, (PROMPT,), generator=gen)
            model(model.embed(ids), cache, AttentionBatch.single(slot, 0, PROMPT))
        group = DecodeGroup(rows, 1, rows + 1, torch.arange(rows), PROMPT + 1, None)
        at = AttentionBatch(torch.full((rows,), PROMPT), torch.arange(1, rows + 1), group, ())
        embeds = model.embed(torch.randint(0, vocab, (rows,), generator=gen))
        before = embeds.clone()
        layered_cache = copy_cache(cache)
        stacked = model(embeds, cache, at)
        assert torch.equal(embeds, before), "the stack must not write into its input"
        text = model.model.text_model
        rope, x = text.rotary(at.positions, embeds.dtype), embeds
        for i, layer in enumerate(text.layers):
            x = layer(x, rope, (layered_cache.k[i], layered_cache.v[i]), at)
        return stacked, text.norm(x), cache, layered_cache


@pytest.mark.parametrize("rows", [1, 3, 9])
@pytest.mark.parametrize("kind", ["bf16", "Q8_0", "Q4K"])
def test_decode_stack_equals_the_layers_one_by_one(wide: Path, wide_bf16: Path, kind: str, rows: int) -> None:
    if kind == "Q4K" and not native.q4_available():
        pytest.skip("the 4-bit kernel needs AVX-512 VNNI")
    loaded = load(str(wide_bf16), progress=False) if kind == "bf16" else load(str(wide), progress=False, isq=kind)
    model = loaded.model
    assert model.model.text_model.decode_stack() is not None
    stacked, layered, cache, layered_cache = decode_both_ways(model, rows)
    # The only difference is SiLU's exponential (the kernels' polynomial against PyTorch's): a few ulp.
    assert (stacked - layered).abs().max() <= 1e-5 * layered.abs().max()
    for ours, theirs in zip(cache.k + cache.v, layered_cache.k + layered_cache.v, strict=True):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        written = ours[1 : rows + 1, :, PROMPT]
        assert written.abs().sum() > 0 and not ours[1 : rows + 1, :, PROMPT + 1 :].any()
        assert not ours[0].any() and not ours[rows + 1 :].any()  # other slots untouched


@pytest.mark.parametrize("isq", [None, "Q6K"])
def test_decode_stack_is_off_where_a_layer_has_no_native_kernel(wide: Path, isq: str | None) -> None:
    """fp32 weights (PyTorch's GEMV) and types served by another kernel (Q6K: fp16) decode layer by layer."""
    model = load(str(wide), progress=False, isq=isq).model
    assert model.model.text_model.decode_stack() is None


def test_decode_stack_is_safe_for_two_threads_on_one_model(wide_bf16: Path) -> None:
    """Two engines may share a loaded model: decode steps on two caches at once give each what it gives alone."""
    model = load(str(wide_bf16), progress=False).model
    steps = [decode_both_ways(model, rows)[0] for rows in (1, 3)]  # alone: (seeded) the same inputs again below
    results: dict[int, list[torch.Tensor]] = {1: [], 3: []}

    def run(rows: int) -> None:
        for _ in range(5):
            results[rows].append(decode_both_ways(model, rows)[0])

    threads = [threading.Thread(target=run, args=(rows,)) for rows in (1, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for alone, together in zip(steps, (results[1], results[3]), strict=True):
        assert len(together) == 5 and all(torch.equal(alone, out) for out in together)


def test_engine_greedy_tokens_are_the_same_with_and_without_the_stack(
    wide_bf16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine (alone, and four requests batched into decode steps over contiguous slots), the stack
    gives the greedy tokens of the layer-by-layer path."""
    loaded = load(str(wide_bf16), progress=False)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe the picture in one sentence."}]}]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for _ in range(4)]

    def run() -> list[list[int]]:
        alone = generate(Engine(loaded, EngineConfig(max_num_seqs=1, cache_slots=0)), messages, params[0])
        engine = Engine(loaded, EngineConfig(max_num_seqs=4, cache_slots=0))
        ids = [engine.add(engine.text_prompt(list(range(5 + i, 25 + i))), p) for i, p in enumerate(params)]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids  # the step's new tokens
        assert all(len(t) == 12 for t in tokens.values())
        return [alone.token_ids, *(tokens[i] for i in ids)]

    stack_calls = 0
    original = native.DecodeStack.__call__

    def counted(self: native.DecodeStack, *args: Any) -> None:
        nonlocal stack_calls
        stack_calls += 1
        original(self, *args)

    monkeypatch.setattr(native.DecodeStack, "__call__", counted)
    with_stack = run()
    assert stack_calls >= 11 + 11  # every decode step of the one alone and of the batch
    monkeypatch.setattr(type(loaded.model.model.text_model), "decode_stack", lambda self: None)
    assert run() == with_stack
