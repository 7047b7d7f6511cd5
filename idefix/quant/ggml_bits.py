"""Bit-level helpers shared by the GGML block codecs: C rounding, fp16 fields, packing, ordered sums.

Everything here reproduces what ggml's C code does to the last bit on x86-64 (IEEE fp32, no FMA, no
reassociation), so that the codecs built on it produce the same bytes as llama.cpp.
"""

from __future__ import annotations

import torch

# ggml's GROUP_MAX_EPS: groups whose largest |x| is below this are treated as all-zero.
GROUP_MAX_EPS = 1e-15


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `nearest_int`: add 1.5 * 2^23 in fp32 and read the mantissa bits.

    Round-half-to-even for |v| < 2^22; reproduces the same (wrapped) values as C beyond that. Returns int32.
    """
    return ((v + 12582912.0).view(torch.int32) & 0x7FFFFF) - 0x400000


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C `roundf` (halves away from zero), exact: floor(|v|) + floor(2 * frac) avoids the |v| + 0.5 rounding trap."""
    a = v.abs()
    fl = a.floor()
    return torch.copysign(fl + (2 * (a - fl)).floor(), v)


def wrap_int8(v: torch.Tensor) -> torch.Tensor:
    """C's int -> int8_t conversion (modulo 256), as int32."""
    return ((v & 0xFF) ^ 0x80) - 0x80


def first_absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The signed value of the first element with the largest |x| along `dim` (C: `if (amax < fabsf(v))`).

    All-zero slices give +0.0, like the C loops that start from `max = 0`.
    """
    idx = x.abs().argmax(dim, keepdim=True)  # argmax returns the first maximal index
    mx = x.gather(dim, idx).squeeze(dim)
    return torch.where(mx == 0, torch.zeros_like(mx), mx)


def recip(v: torch.Tensor) -> torch.Tensor:
    """1.0f / v as a true fp32 division (torch's `1 / t` multiplies by a reciprocal and can be off by an ulp)."""
    return torch.ones_like(v) / v


def const_div(c: float, v: torch.Tensor) -> torch.Tensor:
    """(float)c / v with a true fp32 division; `c` must be exactly representable in fp32."""
    return torch.full_like(v, c) / v


def div_const(v: torch.Tensor, c: float) -> torch.Tensor:
    """v / (float)c as a true fp32 division on every device (CUDA turns `t / scalar` into a reciprocal multiply)."""
    return v / torch.full_like(v, c)


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 strictly left to right like the C loops (torch.sum's tree order differs in the last bit).

    Callers keep groups element-major ([n, ...groups]) so every addition is one contiguous vector op over all groups.
    """
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[N] float32 -> [N, 2] uint8: GGML_FP32_TO_FP16 (round to nearest even), little-endian."""
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """[N, 2] uint8 -> [N] float32."""
    return b.contiguous().view(torch.float16).view(-1).float()


def f32_bytes(v: torch.Tensor) -> torch.Tensor:
    """[N] float32 -> [N, 4] uint8, little-endian."""
    return v.to(torch.float32).contiguous().view(torch.uint8).view(-1, 4)


def f32_value(b: torch.Tensor) -> torch.Tensor:
    """[N, 4] uint8 -> [N] float32."""
    return b.contiguous().view(torch.float32).view(-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[N, 8k] values 0/1 -> [N, k] uint8; bit i of the row lands in byte i // 8 at position i % 8 (LSB first)."""
    n = bits.shape[0]
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=bits.device)
    return (bits.to(torch.uint8).view(n, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_bits: [N, k] uint8 -> [N, 8k] uint8 in {0, 1}."""
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).view(b.shape[0], -1)


def pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """[..., 4, 32] values 0..3 -> [..., 32] uint8: plane k goes to bits 2k..2k+1 (Q2_K / Q3_K `qs`, Q6_K `qh`)."""
    q = q.to(torch.uint8)
    return q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)


def unpack_crumbs(b: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_crumbs: [..., 32] uint8 -> [..., 4, 32] uint8 in 0..3."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    return (b.unsqueeze(-2) >> shifts) & 3
