"""Idefics3ForConditionalGeneration: vision tower + connector + Llama decoder + LM head.

Module names match the hub checkpoints (`model.vision_model.*`, `model.connector.*`,
`model.text_model.*`, `lm_head`), so weights load by name without a renaming table.
"""

from __future__ import annotations

import torch
from torch import nn

from idefix.model.attention import AttentionBatch, KVCache
from idefix.model.config import Idefics3Config
from idefix.model.connector import Connector
from idefix.model.llama import LlamaModel
from idefix.model.siglip import VisionTransformer


class Idefics3Inner(nn.Module):
    """`model.*` in the checkpoint."""

    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(config.vision)
        self.connector = Connector(config)
        self.text_model = LlamaModel(config.text)


class Idefics3Model(nn.Module):
    def __init__(self, config: Idefics3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics3Inner(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the LM head's weight may be stored narrower: Bf16Linear)."""
        return self.model.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, num_slots: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        text = self.config.text
        return KVCache(
            text.num_hidden_layers,
            num_slots,
            text.num_key_value_heads,
            max_len,
            text.head_dim,
            dtype or self.dtype,
            self.model.text_model.layer_devices(),
        )

    def encode_images(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, H, W] + mask [N, H, W] -> image token embeddings [N, image_seq_len, text_hidden]."""
        features = self.model.vision_model(pixel_values.to(self.dtype), pixel_mask)
        return self.model.connector(features)

    def embed(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings [N, hidden] of ids [N]; the positions in image_mask [N] bool (default: every
        `<image>` id) take the rows of image_embeds [M, hidden], in order."""
        embeds = self.model.text_model.embed_tokens(input_ids)
        if image_embeds is None:
            return embeds
        if image_mask is None:
            image_mask = input_ids == self.config.image_token_id
        rows = image_embeds.reshape(-1, image_embeds.shape[-1])
        count = int(image_mask.sum())
        if count != rows.shape[0]:
            raise ValueError(f"{count} <image> tokens in the prompt but {rows.shape[0]} image embeddings")
        return embeds.masked_scatter(image_mask[:, None], rows.to(embeds.dtype))

    def forward(self, embeds: torch.Tensor, cache: KVCache, at: AttentionBatch) -> torch.Tensor:
        """embeds [N, hidden] -> last hidden states [N, hidden]; logits are `self.logits(...)`."""
        return self.model.text_model(embeds, cache, at)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
