"""CUDA-only paths: device maps across cuda:0 and the CPU, quantized layers and bf16 on the GPU.
Skipped without CUDA (see tests/conftest.py); run them where a GPU is available."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load
from idefix.sampling import SamplingParams
from tests.checkpoints import Spec, build_checkpoint

pytestmark = pytest.mark.gpu

DEEP = Spec("deep", patch=16, tile=64, scale=2, heads=16, kv_heads=4, tied=False, split=True, longest_edge=128,
            intermediate=1024, vision_hidden=256, vision_intermediate=512)  # fmt: skip
MESSAGES = [{"role": "user", "content": "Describe the picture in one sentence, please."}]
GREEDY = SamplingParams(temperature=0, max_tokens=24)


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
