"""How well a demo model's vision tower sees, apart from what its text model makes of it.

    python demo/vision_check.py                      # idefix/demo/model
    python demo/vision_check.py --model runs/main --steps 200

Fits fresh linear heads (demo/probe.py's) on the frozen global-tile tokens of new random scenes and prints,
over the last 50 batches: how often the token holding an object's centre names its shape and colour, and how
often reading the shape of every centre token counts every shape of a scene exactly. High numbers here and low
held-out accuracy mean the text model, not the vision tower, is what still has to learn.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import AutoProcessor, Idefics3ForConditionalGeneration

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import build  # noqa: E402
import probe  # noqa: E402
import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "idefix" / "demo" / "model"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(args.model)
    model = Idefics3ForConditionalGeneration.from_pretrained(args.model).eval()
    head = probe.GlobalTileProbe(model.config.text_config.hidden_size)
    optim = torch.optim.Adam(head.parameters(), lr=3e-3)
    rng, side, recent = random.Random(args.seed), math.isqrt(build.IMAGE_SEQ_LEN), []
    for _ in range(args.steps):
        with torch.no_grad():
            pixels, scene_list = train.vision_batch(processor, rng, args.batch)
            features = model.model.connector(model.model.vision_model(pixel_values=pixels).last_hidden_state)
        targets = probe.targets(scene_list, build.TILE, side)
        head(features, targets).backward()
        optim.step()
        optim.zero_grad()
        with torch.no_grad():
            centre = targets["centre_shape"] > 0
            shapes = head.centre_shape(features).argmax(-1)
            colours = head.centre_colour(features).argmax(-1)
            counted = F.one_hot(shapes, probe.N_SHAPES + 1)[..., 1:].sum(1)
            recent.append(
                (
                    (shapes[centre] == targets["centre_shape"][centre]).float().mean().item(),
                    (colours[centre] == targets["centre_colour"][centre]).float().mean().item(),
                    (counted == targets["counts"]).all(-1).float().mean().item(),
                )
            )
    shape, colour, counts = (sum(values) / len(values) for values in zip(*recent[-50:], strict=True))
    print(f"object shape {shape:.1%} · object colour {colour:.1%} · every count of a scene {counts:.1%}")


if __name__ == "__main__":
    main()
