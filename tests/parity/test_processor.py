"""Our Processor (template + image processing + <image> expansion + tokenizer) against Idefics3Processor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefix.model.config import Idefics3Config
from idefix.processing.processor import Processor
from tests.checkpoints import Spec

transformers = pytest.importorskip("transformers")


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16)).convert("I;16")
    rgba = Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(colors=16)
    return rgba.convert(mode)


def _cases(spec: Spec) -> dict[str, list[Image.Image]]:
    tile, edge = spec.tile, spec.longest_edge
    return {
        "text-only": [],
        "square": [_noise(97, 97)],
        "1x1": [_noise(1, 1)],
        "3000x20": [_noise(3000, 20)],
        "20x3000": [_noise(20, 3000)],
        "one-tile": [_noise(tile, tile)],
        "one-pixel-over-a-tile": [_noise(tile + 1, tile)],
        "longest-edge": [_noise(edge, edge // 3)],
        "grayscale": [_noise(80, 50, "L")],
        "rgba": [_noise(50, 80, "RGBA")],
        "palette": [_noise(60, 60, "P")],
        "16-bit": [_noise(40, 70, "I;16")],
        "two-images": [_noise(150, 60, seed=1), _noise(30, 90, seed=2)],
        "three-images": [_noise(tile, tile, seed=3), _noise(200, 30, seed=4), _noise(5, 5, seed=5)],
    }


def _messages(count: int) -> list[dict]:
    first = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": "What is shown here?"}]
    return [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": first},
        {"role": "assistant", "content": [{"type": "text", "text": "Shapes, café 🙂."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
    ]


def test_processor_matches_reference(checkpoint: tuple[Spec, Path]) -> None:
    spec, path = checkpoint
    reference = transformers.AutoProcessor.from_pretrained(path)
    ours = Processor.from_dir(path, Idefics3Config.from_dir(path).image_seq_len)
    for name, images in _cases(spec).items():
        messages = _messages(len(images))
        text = reference.apply_chat_template(messages, add_generation_prompt=True)
        want = reference(text=text, images=[images] if images else None, return_tensors="pt")
        got = ours(messages, images)
        assert got.token_ids == want["input_ids"][0].tolist(), name
        if not images:
            assert got.images is None
            continue
        assert got.images is not None
        real = want["pixel_values"][0]
        real_mask = want["pixel_attention_mask"][0].bool()
        assert got.images.pixel_values.shape == real.shape, name
        assert (got.images.pixel_values - real).abs().max().item() <= 1e-6, name
        assert torch.equal(got.images.pixel_attention_mask, real_mask), name
