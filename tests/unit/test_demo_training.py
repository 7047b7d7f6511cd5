"""The demo model's training script runs end to end (a few steps), and its training-only pieces are right:
the per-token probe targets line up with the image tokens, and the edge stem is what it says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from idefix.demo import scenes
from idefix.engine.engine import Engine
from idefix.generate import generate
from idefix.loading import load

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "demo"))
import probe  # noqa: E402
import train  # noqa: E402


def test_a_short_training_run_writes_a_model_idefix_loads(tmp_path: Path) -> None:
    out = tmp_path / "model"
    command = [sys.executable, str(ROOT / "demo" / "train.py"), "--steps", "3", "--batch", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"steps": 3' in result.stdout
    engine = Engine(load(str(out), progress=False))
    answer = generate(engine, [{"role": "user", "content": "What shape is shown?"}])
    assert answer.usage.completion_tokens >= 1


def test_dense_targets_mark_the_tokens_an_object_covers() -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ROOT / "idefix" / "demo" / "model")
    # A big square (side 0.85 x 2.2 cells = 80 of 128 px) centred in a plain black image: in the global tile
    # (the last one, 64 px, 4x4 tokens of 16 px) it spans pixels 12-52, so it fills the 2x2 middle tokens and
    # touches each corner token by 4x4 pixels only.
    square = scenes.Obj("square", "red", 1, 1, 2.2, 0.0, 0.0, 0.0)
    scene = scenes.Scene(128, 128, "black", None, (square,))
    pixels = processor.image_processor([[scenes.render(scene)]], return_tensors="pt")["pixel_values"]
    shape, colour = probe.dense_targets(processor.image_processor, [[scene]], pixels, tokens=16)
    global_tile = shape[-1].view(4, 4, -1)
    square_class = scenes.SHAPES.index("square") + 1
    assert global_tile[1:3, 1:3, square_class].min() > 0.99
    assert global_tile[0, 0, 0] > 0.9 and global_tile[3, 3, 0] > 0.9  # corners: (nearly) background only
    red = list(scenes.COLOURS).index("red") + 1
    assert torch.allclose(colour[..., red], shape[..., square_class])
    assert torch.allclose(shape.sum(-1), torch.ones(shape.shape[:2]))


def test_edge_stem_filters_are_unit_edges_and_flat_colours() -> None:
    conv = torch.nn.Conv2d(3, 128, 8, 8)
    train.edge_stem(conv, seed=0)
    w = conv.weight.detach()
    edges = w[:64].flatten(1)
    assert torch.allclose(edges.norm(dim=1), torch.ones(64), atol=1e-5)  # unit norm over the 3 x 8 x 8 inputs
    assert torch.allclose(w[:64, 0], w[:64, 1]) and torch.allclose(w[:64, 1], w[:64, 2])  # colour-blind edges
    assert torch.allclose(w[64:].amax(dim=(2, 3)), w[64:].amin(dim=(2, 3)))  # flat colour filters
    assert conv.bias is not None and not conv.bias.any()
