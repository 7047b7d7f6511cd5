"""Training-only auxiliary loss that makes the mean image feature describe the scene.

At initialisation a decoder's attention is close to uniform, so what the answer position reads from an image
is roughly the mean of its image tokens. From scratch, that mean carries almost nothing about a small object,
and the text model learns to ignore the image (measured: loss stuck at the blind-guess level for 500+ steps).
A linear probe on the mean connector output that must predict the background, per-shape counts and which
colour-shape sits in which cell gives the vision tower a direct signal; the probe is dropped after training
and the shipped checkpoint stays a plain Idefics3 model.

`DenseProbe` is the local counterpart: every image token (one 16x16-pixel block of a tile after the pixel
shuffle) must tell which shape and which colour cover its block, read from a label rendering of the scene put
through the image processor's own resize / split / pad with nearest-neighbour sampling. That teaches the vision
tower to see each object where it is, which the pooled probe alone does only slowly.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from idefix.demo import scenes

N_BG, N_SHAPES, N_COLOURS, MAX_COUNT = len(scenes.BACKGROUNDS), len(scenes.SHAPES), len(scenes.COLOURS), 6
N_CELL_TARGETS = N_COLOURS * N_SHAPES * 9


class SceneProbe(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.bg = nn.Linear(hidden, N_BG)
        self.counts = nn.Linear(hidden, N_SHAPES * (MAX_COUNT + 1))
        self.cells = nn.Linear(hidden, N_CELL_TARGETS)

    def forward(self, pooled: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        bg = F.cross_entropy(self.bg(pooled), targets["bg"])
        counts = self.counts(pooled).view(-1, N_SHAPES, MAX_COUNT + 1)
        count = F.cross_entropy(counts.flatten(0, 1), targets["counts"].flatten())
        # Summed over the 360 cell targets (not averaged) so that the rare positives are not drowned out.
        cells = F.binary_cross_entropy_with_logits(self.cells(pooled), targets["cells"], reduction="sum")
        return bg + count + cells / pooled.shape[0] / 10


def targets(scene_list: list[scenes.Scene]) -> dict[str, torch.Tensor]:
    bg = torch.tensor([list(scenes.BACKGROUNDS).index(s.background) for s in scene_list])
    counts = torch.tensor([[s.count(shape) for shape in scenes.SHAPES] for s in scene_list])
    cells = torch.zeros(len(scene_list), N_COLOURS, N_SHAPES, 9)
    for i, s in enumerate(scene_list):
        for o in s.objects:
            cells[i, list(scenes.COLOURS).index(o.colour), scenes.SHAPES.index(o.shape), o.row * 3 + o.col] = 1
    return {"bg": bg, "counts": counts, "cells": cells.flatten(1)}


def pooled_features(features: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """Max over each sample's image tokens of the connector output: `features` [n_real_tiles, T, D] in sample
    order, `pixel_values` [B, N, 3, H, W] with all-zero padding tiles (the rule the model uses to drop them).
    Max, not mean: a mean over ~80 tokens drowns a small object, and neither a ViT nor a CNN learned shapes
    through a mean-pooled readout here (both stayed at chance for 1000+ steps, the CNN learned in 300 with max)."""
    tiles_per_sample = (pixel_values != 0).flatten(2).any(-1).sum(1).tolist()
    return torch.stack([chunk.amax(dim=(0, 1)) for chunk in features.split(tiles_per_sample)])


class DenseProbe(nn.Module):
    """Per image token: the fraction of its pixels that each shape (or the background) and each colour cover."""

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = nn.Linear(hidden, N_SHAPES + 1)
        self.colour = nn.Linear(hidden, N_COLOURS + 1)

    def forward(self, features: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        shape, colour = targets
        return F.cross_entropy(self.shape(features).flatten(0, 1), shape.flatten(0, 1)) + F.cross_entropy(
            self.colour(features).flatten(0, 1), colour.flatten(0, 1)
        )


def label_image(scene: scenes.Scene) -> Image.Image:
    """The scene with background 0 and each object drawn as (shape index + 1, colour index + 1, 0)."""
    image = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    colours = list(scenes.COLOURS)
    scenes.draw_objects(image, scene, lambda o: (scenes.SHAPES.index(o.shape) + 1, colours.index(o.colour) + 1, 0))
    return image


def dense_targets(image_processor, scene_lists: list[list[scenes.Scene]], pixel_values: torch.Tensor, tokens: int):
    """Soft per-token targets ([n_real_tiles, tokens, classes] for shape and colour) aligned with the model's
    image tokens: the same tiles as `pixel_values` (all-zero padding tiles dropped), row-major blocks."""
    labels = image_processor(
        [[label_image(s) for s in scene_list] for scene_list in scene_lists],
        resample=Image.Resampling.NEAREST,
        do_rescale=False,
        do_normalize=False,
        return_tensors="pt",
    )["pixel_values"]
    real = (pixel_values != 0).flatten(2).any(-1)
    labels = labels[real].round().long()  # [n, 3, H, W]
    side = int(tokens**0.5)

    def soft(channel: torch.Tensor, classes: int) -> torch.Tensor:
        one_hot = F.one_hot(channel, classes).permute(0, 3, 1, 2).float()  # [n, classes, H, W]
        return F.adaptive_avg_pool2d(one_hot, side).flatten(2).transpose(1, 2)  # [n, tokens, classes]

    return soft(labels[:, 0], N_SHAPES + 1), soft(labels[:, 1], N_COLOURS + 1)
