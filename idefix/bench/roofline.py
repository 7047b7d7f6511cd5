"""The machine's limits and what a model needs from them.

- memory bandwidth: a STREAM-style read probe (torch `sum` over a large buffer, best of a few runs);
- GEMM throughput: a plain `torch.matmul` of the vision MLP's shape, in the compute dtype;
- per decode step: the weight bytes read (text decoder layers + final norm + LM head, as stored: a
  quantized layer counts its packed bytes) plus the KV cache read, and the matmul FLOPs;
- per vision tile: the FLOPs of the SigLIP tower and the connector.

A decode step cannot be faster than max(bytes / bandwidth, FLOPs / GEMM throughput); the fraction of that
bound a measured rate reaches is what the tables show next to every decode figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from idefix.bench.stats import Stats, repeat, timed
from idefix.model.config import Idefics3Config


def bandwidth_gbs(mib: int, device: torch.device, runs: int = 5) -> Stats:
    """Read bandwidth in GB/s: torch.sum over a buffer of `mib` MiB (fp32), after one untimed pass."""
    buffer = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)

    def once(_: int) -> float:
        seconds = timed(lambda: _sync(device, buffer.sum()))
        return buffer.numel() * 4 / seconds / 1e9

    return repeat(once, 1, runs)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, runs: int = 5) -> Stats:
    """GFLOP/s of torch.matmul([m, k] @ [k, n]) in `dtype`."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)

    def once(_: int) -> float:
        seconds = timed(lambda: _sync(device, torch.matmul(a, b)))
        return 2 * m * k * n / seconds / 1e9

    return repeat(once, 1, runs)


def vision_gemm_shape(config: Idefics3Config, tiles: int) -> tuple[int, int, int]:
    """The vision MLP's first matmul for `tiles` tiles: [tiles * patches, hidden] @ [hidden, intermediate]."""
    vision = config.vision
    return tiles * vision.patches_per_side**2, vision.hidden_size, vision.intermediate_size


def vision_flops_per_tile(config: Idefics3Config) -> float:
    """Matmul FLOPs of one full tile through the SigLIP tower and the connector (norms, softmax excluded)."""
    v = config.vision
    t, h = v.patches_per_side**2, v.hidden_size
    per_layer = 2 * t * h * (4 * h + 2 * v.intermediate_size) + 2 * 2 * t * t * h  # projections, MLP; QK^T, AV
    patches = 2 * t * (v.num_channels * v.patch_size**2) * h
    connector = 2 * t * h * config.text.hidden_size  # [t / s^2, h * s^2] @ [h * s^2, text hidden]
    return float(v.num_hidden_layers * per_layer + patches + connector)


@dataclass(frozen=True)
class DecodeCost:
    """What one decode step of one model reads and computes.

    weight_bytes: text decoder layers + final norm + LM head as stored (the embedding reads one row).
    kv_bytes_per_position: K and V of one position over all layers, in the KV cache dtype.
    flops_per_token: 2 x the matmul weights (+ attention, added per context position by `bound`).
    attention_flops_per_position: QK^T and AV FLOPs of one query against one cached position.
    """

    weight_bytes: int
    kv_bytes_per_position: int
    flops_per_token: float
    attention_flops_per_position: float

    @classmethod
    def of(cls, model: nn.Module, config: Idefics3Config, kv_dtype: torch.dtype) -> DecodeCost:
        """`model`: idefix's Idefics3Model or transformers' Idefics3ForConditionalGeneration (same names)."""
        text_model = model.get_submodule("model.text_model")
        parts = [text_model.get_submodule("layers"), text_model.get_submodule("norm"), model.get_submodule("lm_head")]
        weight_bytes = sum(_stored_bytes(part) for part in parts)
        macs = sum(_linear_macs(part) for part in parts)
        text = config.text
        kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * kv_dtype.itemsize
        attention = 2 * 2 * text.num_hidden_layers * text.num_attention_heads * text.head_dim
        return cls(weight_bytes, kv, 2.0 * macs, float(attention))

    def bound_tok_s(self, batch: int, context: float, gbs: float, gflops: float) -> float:
        """Aggregate tokens/s no engine can beat: `batch` rows, each over `context` positions on average."""
        read = self.weight_bytes + batch * context * self.kv_bytes_per_position
        flops = batch * (self.flops_per_token + context * self.attention_flops_per_position)
        seconds = max(read / (gbs * 1e9), flops / (gflops * 1e9))
        return batch / seconds


def _stored_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _linear_macs(module: nn.Module) -> int:
    """Multiply-adds of one token through every Linear-like layer (anything with in/out_features)."""
    total = 0
    for sub in module.modules():
        in_f, out_f = getattr(sub, "in_features", None), getattr(sub, "out_features", None)
        if isinstance(in_f, int) and isinstance(out_f, int):
            total += in_f * out_f
    return total


def _sync(device: torch.device, result: torch.Tensor) -> torch.Tensor:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result
