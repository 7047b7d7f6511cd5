"""Training-only auxiliary loss that makes the mean image feature describe the scene.

At initialisation a decoder's attention is close to uniform, so what the answer position reads from an image
is roughly the mean of its image tokens. From scratch, that mean carries almost nothing about a small object,
and the text model learns to ignore the image (measured: loss stuck at the blind-guess level for 500+ steps).
A linear probe on the mean connector output that must predict the background, per-shape counts and which
colour-shape sits in which cell gives the vision tower a direct signal; the probe is dropped after training
and the shipped checkpoint stays a plain Idefics3 model.
"""

from __future__ import annotations

import torch
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
    """Mean connector output per sample: `features` [n_real_tiles, T, D] in sample order, `pixel_values`
    [B, N, 3, H, W] with all-zero padding tiles (the rule the model uses to drop them)."""
    tiles_per_sample = (pixel_values != 0).flatten(2).any(-1).sum(1).tolist()
    return torch.stack([chunk.mean(dim=(0, 1)) for chunk in features.split(tiles_per_sample)])
