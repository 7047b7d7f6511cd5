"""End to end: our load + processor + greedy generate against transformers' processor + generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load
from idefix.sampling import SamplingParams
from tests.checkpoints import Spec

transformers = pytest.importorskip("transformers")


def test_greedy_answer_matches_reference(checkpoint: tuple[Spec, Path]) -> None:
    spec, path = checkpoint
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 255, (90, 140, 3), dtype=np.uint8))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}],
        }
    ]
    processor = transformers.AutoProcessor.from_pretrained(path)
    reference = transformers.Idefics3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[[image]], return_tensors="pt")
    with torch.no_grad():
        out = reference.generate(**inputs, max_new_tokens=24, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = reference.generation_config.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos)]

    engine = Engine(load(str(path), progress=False))
    result = generate(engine, messages, SamplingParams(temperature=0, max_tokens=24))
    assert result.token_ids == expected
    assert result.usage.prompt_tokens == inputs["input_ids"].shape[1]
    assert result.text == processor.tokenizer.decode(expected, skip_special_tokens=True)
