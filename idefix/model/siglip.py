"""The SigLIP vision tower as Idefics3 uses it: variable-size tiles with a patch attention mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefix import native
from idefix.model.config import VisionConfig
from idefix.model.layers import activation

CPU_GROUP_BYTES = 32 << 20  # glibc's largest heap-served block (its mmap threshold's ceiling on 64-bit)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        positions = self.per_side**2  # `_weight`: no random init (see the text embedding in llama.py)
        self.position_embedding = nn.Embedding(
            positions, config.hidden_size, _weight=torch.empty(positions, config.hidden_size)
        )

    def forward(self, pixels: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W], patch_mask [N, H/p, W/p] bool -> [N, H/p * W/p, hidden]."""
        embeds = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        # The sum would keep the conv's [N, hidden, patches] memory order, and every layer norm and matmul of
        # the tower would copy it to rows first (measured: 25 copies of the activations per tile batch).
        return (embeds + self.position_embedding(self.position_ids(patch_mask))).contiguous()

    def position_ids(self, patch_mask: torch.Tensor) -> torch.Tensor:
        # A tile of h x w real patches is spread over the full per_side x per_side position grid
        # (NaViT-style fractional coordinates), exactly as the reference buckets them.
        n, rows, cols = patch_mask.shape
        device = patch_mask.device
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side, device=device)
        real_h = patch_mask[:, :, 0].sum(dim=1)  # [N]
        real_w = patch_mask[:, 0, :].sum(dim=1)
        frac_h = torch.arange(rows, device=device, dtype=torch.float32)[None] * (1.0 / real_h)[:, None]
        frac_w = torch.arange(cols, device=device, dtype=torch.float32)[None] * (1.0 / real_w)[:, None]
        bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        ids = (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(n, -1)
        return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.heads, self.head_dim) for p in self._qkv())
        if mask is None and self._native(x):
            return self.out_proj(native.attention(q, k, v, self.head_dim**-0.5))
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, heads, T, D]
        return self.out_proj(out.transpose(1, 2).reshape(n, t, -1))

    def _native(self, x: torch.Tensor) -> bool:
        """Full tiles in fp32 on an AVX-512 CPU: idefix.native's attention (~1.3x PyTorch's on SigLIP's shapes)."""
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        return cpu_fp32 and self.head_dim <= native.ATTENTION_MAX_HEAD_DIM and native.available()

    def _qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)
        self.tanh_gelu = config.hidden_act in ("gelu_pytorch_tanh", "gelu_new")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):  # fc1's bias and the activation in one pass over its product (~10% of a tile)
            return self.fc2(native.bias_gelu_tanh_(torch.matmul(x, self.fc1.weight.t()), self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))

    def _native(self, x: torch.Tensor) -> bool:
        """A tanh GELU after a plain (not quantized) fc1, in fp32 on an AVX-512 CPU."""
        if not (type(self.fc1) is nn.Linear and self.fc1.bias is not None and self.tanh_gelu):
            return False
        return x.device.type == "cpu" and x.dtype == self.fc1.weight.dtype == torch.float32 and native.available()


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """`model.vision_model` in the checkpoint."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, C, H, W], pixel_mask [N, H, W] bool -> patch features [N, H/p * W/p, hidden].

        On the CPU the tiles go through in groups whose widest activation stays under CPU_GROUP_BYTES: glibc
        hands larger blocks back to the kernel when they are freed, so every layer of a whole-image batch
        would fault in fresh pages (measured ~1.2x slower per tile on SmolVLM-256M's tower). Tiles are
        independent, so the grouping changes nothing but the time."""
        if pixels.device.type == "cpu":
            c = self.config
            patches = (pixels.shape[2] // c.patch_size) * (pixels.shape[3] // c.patch_size)
            group = max(1, CPU_GROUP_BYTES // (patches * c.intermediate_size * pixels.element_size()))
            if pixels.shape[0] > group:
                return torch.cat([self._tiles(pixels[i : i + group], pixel_mask[i : i + group])
                                  for i in range(0, pixels.shape[0], group)])  # fmt: skip
        return self._tiles(pixels, pixel_mask)

    def _tiles(self, pixels: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        n, rows, cols = pixels.shape[0], pixels.shape[2] // p, pixels.shape[3] // p
        # A patch is real when any of its pixels is; a remainder smaller than a patch is dropped, as the conv does.
        cropped = pixel_mask[:, : rows * p, : cols * p]
        patch_mask = cropped.reshape(n, rows, p, cols, p).any(dim=4).any(dim=2)
        x = self.embeddings(pixels, patch_mask)
        flat = patch_mask.reshape(n, 1, 1, -1)
        attn_mask = None if bool(flat.all()) else flat  # padded patches are never attended to
        for layer in self.encoder.layers:
            x = layer(x, attn_mask)
        return self.post_layernorm(x)
