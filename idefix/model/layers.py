"""Small building blocks shared by the vision tower and the text decoder."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from idefix import native
from idefix.errors import ModelLoadError
from idefix.model.config import TextConfig
from idefix.quant.linear import QuantLinear

# In place: the model never runs under autograd (its weights never require grad), and overwriting a projection's
# fresh output spares a tensor as large as the MLP's widest activation (on the CPU, fresh memory is slow to touch).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu": lambda x: torch.ops.aten.gelu_(x),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "relu": lambda x: F.relu(x, inplace=True),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name`, applied in place (see ACTIVATIONS)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ModelLoadError(f"activation {name!r} is not supported (supported: {sorted(ACTIVATIONS)})") from None


class Bf16Linear(nn.Module):
    """A Linear of an fp32 model on the CPU whose weight stays the checkpoint's bf16: every value is the one an fp32
    copy would hold (bf16 widens to fp32 exactly), in half the memory and half the bytes a decode step reads. Up to
    native.MAX_ROWS rows go through the native kernel (widening in registers, fp32 products and sums); more rows
    (prefill) widen the weight for one fp32 matmul."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, splits: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to(torch.bfloat16).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.splits = splits or (self.out_features,)  # out_features of each layer merged into this one (`concat`)
        self._native: native.Matmul | None = None  # bound on first use

    @classmethod
    def concat(cls, parts: list[nn.Module]) -> Bf16Linear | None:
        """One layer whose output is the parts' outputs side by side (q, k, v; gate, up): one kernel call instead
        of several at decode. None unless every part is a Bf16Linear of one input width, all with or without bias."""
        kept = [p for p in parts if isinstance(p, Bf16Linear)]
        if len(kept) != len(parts) or len({(p.in_features, p.bias is None) for p in kept}) != 1:
            return None
        biases: list[torch.Tensor] = [p.bias for p in kept if p.bias is not None]
        bias = torch.cat(biases) if biases else None
        return cls(torch.cat([p.weight for p in kept]), bias, tuple(n for p in kept for n in p.splits))

    def native_spec(self) -> native.LinearSpec:
        """The weight as the native kernels read it."""
        return native.bf16_spec(self.weight)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._native = None  # the weight may move: bind again
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.shape[0] <= native.MAX_ROWS:
            if self._native is None:
                self._native = native.bind(self.native_spec())
            out = self._native(flat if flat.is_contiguous() else flat.contiguous())
        else:
            out = F.linear(flat, self.weight.float())
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the compute dtype, as the reference does; F.rms_norm is that same
        # x * rsqrt(mean(x^2) + eps) in one op (measured 11 us against 16.5 for the four-op form at decode).
        if x.dtype == torch.float32:
            if native.available() and x.device.type == "cpu" and x.is_contiguous() and self.weight.dtype == x.dtype:
                return native.rms_norm(x, self.weight, self.eps)  # one call: ~2 us against F.rms_norm's ~14
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # the weight inside: one op fewer
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def merged(parts: list[nn.Module]) -> QuantLinear | Bf16Linear | None:
    """The parts (q, k, v; gate, up) as one layer when they are all quantized alike or all kept in bf16, else None."""
    return QuantLinear.concat(parts) or Bf16Linear.concat(parts)


class GatedMLP(nn.Module):
    """Llama MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        self.gate_up_proj: QuantLinear | Bf16Linear | None = None  # gate and up in one once fused (see LlamaModel)

    def fuse_projections(self) -> None:
        fused = merged([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).split(self.gate_up_proj.splits, dim=-1)
        return self.down_proj(self.act(gate).mul_(up))


def rope_inv_freq(config: TextConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for the config's rope type (default, linear, llama3)."""
    dim = config.head_dim
    # Explicit CPU device: computed even while the model is built under a `meta` device context.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    rope = config.rope
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, rope)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos / sin tables for rotary position embeddings, computed per call from positions."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, signed sin [N, 1, head_dim], once per forward pass for every layer.

        The signed sin is (-sin, sin) over the two halves, so that `apply_rotary` can rotate with one roll:
        x * cos + roll(x) * signed_sin is bit for bit the reference's x * cos + cat(-x2, x1) * sin."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        sin = freqs.sin()
        cos = torch.cat((freqs, freqs), dim=-1).cos()
        return cos.to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x [N, H, D]; cos, signed_sin [N, 1, D] from Rotary: 4 ops a call instead of 9 (decode runs 2 per layer)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
