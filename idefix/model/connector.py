"""The Idefics3 connector: pixel shuffle (space-to-depth) then a bias-free linear projection."""

from __future__ import annotations

import torch
from torch import nn

from idefix.model.config import Idefics3Config


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[N, S, D] patch features on a square grid -> [N, S / scale^2, D * scale^2].

    Same element order as the reference: each output token gathers a scale x scale block of patches.
    """
    n, seq, dim = x.shape
    side = int(seq**0.5)
    x = x.reshape(n, side, side // scale, dim * scale)
    x = x.permute(0, 2, 1, 3).reshape(n, side // scale, side // scale, dim * scale * scale)
    return x.permute(0, 2, 1, 3).reshape(n, seq // scale**2, dim * scale * scale)


class ModalityProjection(nn.Module):
    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        in_dim = config.vision.hidden_size * config.scale_factor**2
        self.proj = nn.Linear(in_dim, config.text.hidden_size, bias=False)


class Connector(nn.Module):
    """`model.connector` in the checkpoint."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[N, patches, vision_hidden] -> [N, image_seq_len, text_hidden]."""
        return self.modality_projection.proj(pixel_shuffle(features, self.scale_factor))
