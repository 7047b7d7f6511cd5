"""CUDA-only paths: device maps across cuda:0 and the CPU, quantized layers and bf16 on the GPU.
Skipped without CUDA (see tests/conftest.py); run them where a GPU is available."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefix.config import EngineConfig
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load
from idefix.sampling import SamplingParams
from tests.checkpoints import Spec, build_checkpoint

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

DEEP = Spec("deep", patch=16, tile=64, scale=2, heads=16, kv_heads=4, tied=False, split=True, longest_edge=128,
            intermediate=1024, vision_hidden=256, vision_intermediate=512)  # fmt: skip
MESSAGES = [{"role": "user", "content": "Describe the picture in one sentence, please."}]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(autouse=True)
def no_tf32() -> object:
    """Full fp32 on both sides: TF32 would make near-tied greedy picks differ for reasons that are not ours."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _image_messages(seed: int, size: tuple[int, int] = (140, 90)) -> list[dict]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    text = "Describe the image. " * (1 + seed % 3)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def _reference_tokens(path: Path, messages: list[dict], dtype: torch.dtype, max_tokens: int) -> list[int]:
    processor = transformers.AutoProcessor.from_pretrained(path)
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=dtype).to("cuda").eval()
    reference.generation_config.eos_token_id = None
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = messages[0]["content"][0]["image"]
    inputs = processor(text=text, images=[[image]], return_tensors="pt").to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(DEEP, tmp_path_factory.mktemp("deep") / "model")


def _tokens_and_peak(path: Path, **kwargs: object) -> tuple[list[int], int]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    loaded = load(str(path), progress=False, device="cuda", dtype="fp32", **kwargs)  # type: ignore[arg-type]
    tokens = generate(Engine(loaded), MESSAGES, GREEDY).token_ids
    weights = torch.cuda.memory_allocated()
    del loaded
    return tokens, weights


def test_split_across_cuda_and_cpu_gives_the_same_tokens(deep: Path) -> None:
    on_gpu, gpu_bytes = _tokens_and_peak(deep)
    split, split_bytes = _tokens_and_peak(deep, num_device_layers="0:1")  # layer 0 on cuda:0, layer 1 on the CPU
    assert split == on_gpu
    assert split_bytes < gpu_bytes


@pytest.mark.parametrize("isq", ["Q8_0", "Q4K"])
def test_quantized_layers_on_cuda_match_the_cpu(deep: Path, isq: str) -> None:
    cpu = generate(Engine(load(str(deep), progress=False, isq=isq)), MESSAGES, GREEDY).token_ids
    gpu = generate(Engine(load(str(deep), progress=False, isq=isq, device="cuda")), MESSAGES, GREEDY).token_ids
    assert gpu[:8] == cpu[:8]  # different kernels (CPU int4 / fp16 vs CUDA dequantize): early tokens agree


@pytest.mark.parametrize(("dtype", "agree"), [("fp32", 16), ("bf16", 4)])
def test_greedy_on_cuda_matches_transformers_on_cuda(deep: Path, dtype: str, agree: int) -> None:
    """fp32: every token; bf16: both sides round differently (fused vs separate ops), so the early tokens."""
    messages = _image_messages(3)
    expected = _reference_tokens(deep, messages, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], agree)
    engine = Engine(load(str(deep), progress=False, device="cuda", dtype=dtype))
    params = SamplingParams(temperature=0, max_tokens=agree, ignore_eos=True)
    assert generate(engine, messages, params).token_ids == expected


def test_batched_greedy_on_cuda_equals_alone(deep: Path) -> None:
    loaded = load(str(deep), progress=False, device="cuda", dtype="fp32")
    requests = [(_image_messages(i, (60 + 30 * i, 50 + 10 * i)), SamplingParams(temperature=0, max_tokens=6 + 2 * i))
                for i in range(6)]  # fmt: skip
    alone = [generate(Engine(loaded, EngineConfig(max_num_seqs=1)), m, p).token_ids for m, p in requests]
    engine = Engine(loaded, EngineConfig(max_num_seqs=6, max_num_batched_tokens=64))
    ids = [engine.add(engine.prepare(messages), params) for messages, params in requests]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert [tokens[rid] for rid in ids] == alone


def test_cuda_graph_decode_gives_the_eager_tokens(deep: Path) -> None:
    loaded = load(str(deep), progress=False, device="cuda", dtype="fp32")
    requests = [(_image_messages(i, (60 + 30 * i, 50 + 10 * i)), SamplingParams(temperature=0, max_tokens=8 + 4 * i))
                for i in range(5)]  # fmt: skip
    results = []
    for cuda_graphs in (False, True):
        engine = Engine(loaded, EngineConfig(max_num_seqs=5, max_num_batched_tokens=64, cuda_graphs=cuda_graphs))
        assert (engine.runner.graphs is not None) == cuda_graphs
        results.append([generate(engine, m, p).token_ids for m, p in requests[:2]])  # one at a time
        ids = [engine.add(engine.prepare(messages), params) for messages, params in requests]  # together
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
        results[-1] += [tokens[rid] for rid in ids]
        if cuda_graphs:
            assert engine.runner.graphs is not None and engine.runner.graphs.enabled
            assert engine.runner.graphs.graphs  # recorded, and replayed for the later steps
    assert results[1] == results[0]
