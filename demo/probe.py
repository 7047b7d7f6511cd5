"""Training-only auxiliary losses that teach the vision tower to see, read on the global tile's image tokens.

From scratch, a tiny text model learns to ignore an image whose features say nothing yet, and the language
loss alone is too weak a signal to teach a vision tower shapes. So every image token of the global tile (the
whole image squeezed to one tile: 4x4 tokens of 16x16 pixels, each grid cell always in the same place) must
also say, through linear heads that are dropped after training:

- which shape and colour cover its pixels (fractions, from a label rendering of the scene);
- which shape and colour has its centre in the token, if any: one token per object, which is what counting
  needs (objects sit at their cell's centre, and the 3x3 cells fall on distinct tokens of the 4x4 grid);
- the whole scene: background, the count of each shape, and which colour-shape sits in which cell. The tower
  has global attention over the tile's fixed 64 patches, so it can spread this to every token, and the text
  model then reads any of them.

The shipped checkpoint stays a plain Idefics3 model: only the tower's weights carry what the heads taught.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from idefix.demo import scenes

N_BG, N_SHAPES, N_COLOURS, MAX_COUNT = len(scenes.BACKGROUNDS), len(scenes.SHAPES), len(scenes.COLOURS), 6
N_CELL_TARGETS = N_COLOURS * N_SHAPES * 9
COLOURS = list(scenes.COLOURS)


class GlobalTileProbe(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.cover_shape = nn.Linear(hidden, N_SHAPES + 1)
        self.cover_colour = nn.Linear(hidden, N_COLOURS + 1)
        self.centre_shape = nn.Linear(hidden, N_SHAPES + 1)
        self.centre_colour = nn.Linear(hidden, N_COLOURS + 1)
        self.bg = nn.Linear(hidden, N_BG)
        self.counts = nn.Linear(hidden, N_SHAPES * (MAX_COUNT + 1))
        self.cells = nn.Linear(hidden, N_CELL_TARGETS)

    def forward(self, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """`features` [B, T, D]: the global tile's tokens of B single-image samples; `targets` from `targets`."""
        x = features.flatten(0, 1)

        def per_token(head: nn.Linear, target: torch.Tensor, **kwargs) -> torch.Tensor:
            return F.cross_entropy(head(x), target.flatten(0, 1), **kwargs)

        # Most tokens hold no centre; a lighter "none" class keeps the rare centres from being drowned out.
        none_light = torch.ones(1 + max(N_SHAPES, N_COLOURS))
        none_light[0] = 0.2
        cover = per_token(self.cover_shape, targets["cover_shape"])
        cover = cover + per_token(self.cover_colour, targets["cover_colour"])
        centre = per_token(self.centre_shape, targets["centre_shape"], weight=none_light[: N_SHAPES + 1])
        centre = centre + per_token(self.centre_colour, targets["centre_colour"], weight=none_light[: N_COLOURS + 1])
        tokens = features.shape[1]
        bg = per_token(self.bg, targets["bg"][:, None].expand(-1, tokens))
        counts = self.counts(x).view(-1, MAX_COUNT + 1)
        count = F.cross_entropy(counts, targets["counts"].repeat_interleave(tokens, 0).flatten())
        # Summed over the 360 cell targets (not averaged) so that the rare positives are not drowned out.
        cells = F.binary_cross_entropy_with_logits(
            self.cells(x), targets["cells"].repeat_interleave(tokens, 0), reduction="sum"
        )
        return cover + centre + bg + count + cells / x.shape[0] / 10


def global_tiles(per_tile: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """The global tile's entry of each sample: `per_tile` [n_real_tiles, ...] in sample order (the tiles
    themselves, or their image tokens), `pixel_values` [B, N, 3, H, W] of single-image samples, whose last real
    tile is the global one; all-zero tiles are padding (the rule the model uses to drop them)."""
    tiles_per_sample = real_tiles(pixel_values).sum(1)
    return per_tile[tiles_per_sample.cumsum(0) - 1]


def real_tiles(pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: which tiles of `pixel_values` [B, N, 3, H, W] are real (not all-zero padding)."""
    return (pixel_values != 0).flatten(2).any(-1)


def centre_token(obj: scenes.Obj, side: int) -> int:
    """The index of the global-tile token (of `side` x `side`) that holds `obj`'s centre."""
    return int((obj.row + 0.5) / 3 * side) * side + int((obj.col + 0.5) / 3 * side)


def label_image(scene: scenes.Scene) -> Image.Image:
    """The scene with background 0 and each object drawn as (shape index + 1, colour index + 1, 0)."""
    image = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    scenes.draw_objects(image, scene, lambda o: (scenes.SHAPES.index(o.shape) + 1, COLOURS.index(o.colour) + 1, 0))
    return image


def targets(scene_list: list[scenes.Scene], tile: int, side: int) -> dict[str, torch.Tensor]:
    """Targets for the global tile (the image resized to `tile` x `tile`, `side` x `side` tokens) of each scene."""
    labels = torch.stack(
        [torch.from_numpy(np.array(label_image(s).resize((tile, tile), Image.Resampling.NEAREST))) for s in scene_list]
    ).long()  # [B, tile, tile, 3]

    def cover(channel: torch.Tensor, classes: int) -> torch.Tensor:
        one_hot = F.one_hot(channel, classes).permute(0, 3, 1, 2).float()  # [B, classes, tile, tile]
        return F.adaptive_avg_pool2d(one_hot, side).flatten(2).transpose(1, 2)  # [B, tokens, classes]

    centre_shape = torch.zeros(len(scene_list), side * side, dtype=torch.long)
    centre_colour = torch.zeros_like(centre_shape)
    counts = torch.zeros(len(scene_list), N_SHAPES, dtype=torch.long)
    cells = torch.zeros(len(scene_list), N_COLOURS, N_SHAPES, 9)
    for i, s in enumerate(scene_list):
        for o in s.objects:
            token = centre_token(o, side)
            shape, colour = scenes.SHAPES.index(o.shape), COLOURS.index(o.colour)
            centre_shape[i, token], centre_colour[i, token] = shape + 1, colour + 1
            counts[i, shape] += 1
            cells[i, colour, shape, o.row * 3 + o.col] = 1
    return {
        "cover_shape": cover(labels[..., 0], N_SHAPES + 1),
        "cover_colour": cover(labels[..., 1], N_COLOURS + 1),
        "centre_shape": centre_shape,
        "centre_colour": centre_colour,
        "bg": torch.tensor([list(scenes.BACKGROUNDS).index(s.background) for s in scene_list]),
        "counts": counts,
        "cells": cells.flatten(1),
    }
