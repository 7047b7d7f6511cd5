"""GGML's 32-element block formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ports of `quantize_row_q*_ref` / `dequantize_row_q*`).

Every function maps blocks to blocks: quantizers take x [N, 32] float32 and return [N, type_size] uint8 exactly as
GGUF stores a block; dequantizers do the inverse with ggml's fp32 arithmetic. Block layouts (little-endian):

    Q4_0  d:f16  qs[16]                 x = d * (q - 8)
    Q4_1  d:f16  m:f16  qs[16]          x = d * q + m
    Q5_0  d:f16  qh[4]  qs[16]          x = d * (q - 16)
    Q5_1  d:f16  m:f16  qh[4]  qs[16]   x = d * q + m
    Q8_0  d:f16  qs[32] (int8)          x = q * d

`qs` byte j holds element j in its low nibble and element j + 16 in its high nibble; for the 5-bit types bit j of
the little-endian uint32 `qh` is bit 4 of element j.
"""

from __future__ import annotations

import torch

from idefix.quant.ggml_bits import div_const, f16_bytes, f16_value, first_absmax, pack_bits, recip, roundf, unpack_bits


def _inv(d: torch.Tensor) -> torch.Tensor:
    # `const float id = d ? 1.0f/d : 0.0f;`
    return torch.where(d != 0, recip(d), torch.zeros_like(d))


def _min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The C loops keep the first of equal values (matters only for the sign of a zero minimum).
    return x.min(dim=1).values, x.max(dim=1).values


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    # [N, 32] -> [N, 16]: low nibble = first half of the block, high nibble = second half
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    d = first_absmax(x, 1) / -8  # max is the signed value with the largest |x|, so it maps to q = 0
    q = (x * _inv(d)[:, None] + 8.5).trunc().clamp(0, 15).to(torch.uint8)  # MIN(15, (int8_t)(x*id + 8.5f))
    return torch.cat([f16_bytes(d), _nibbles(q)], dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    mn, mx = _min_max(x)
    d = div_const(mx - mn, 15)
    q = ((x - mn[:, None]) * _inv(d)[:, None] + 0.5).trunc().clamp(0, 15).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), _nibbles(q)], dim=1)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    d = first_absmax(x, 1) / -16
    q = (x * _inv(d)[:, None] + 16.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), pack_bits(q >> 4), _nibbles(q)], dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    mn, mx = _min_max(x)
    d = div_const(mx - mn, 31)
    q = ((x - mn[:, None]) * _inv(d)[:, None] + 0.5).trunc().clamp(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), pack_bits(q >> 4), _nibbles(q)], dim=1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = div_const(x.abs().amax(dim=1), 127)
    q = roundf(x * _inv(d)[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=1)


def q4_0_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 18] -> (q uint8 [N, 32] in 0..15, d float32 [N])."""
    return _unnibble(b[:, 2:]), f16_value(b[:, :2])


def q4_1_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 20] -> (q uint8 [N, 32] in 0..15, d [N], m [N])."""
    return _unnibble(b[:, 4:]), f16_value(b[:, :2]), f16_value(b[:, 2:4])


def q8_0_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 34] -> (q int8 [N, 32], d float32 [N])."""
    return b[:, 2:].contiguous().view(torch.int8), f16_value(b[:, :2])


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    q, d = q4_0_parts(b)
    return d[:, None] * (q.float() - 8)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    q, d, m = q4_1_parts(b)
    return d[:, None] * q.float() + m[:, None]


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return _unnibble(qs) | (unpack_bits(qh) << 4)


def q5_0_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 22] -> (q - 16 int8 [N, 32] in -16..15, d float32 [N])."""
    return _q5(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16, f16_value(b[:, :2])


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    q, d = q5_0_parts(b)
    return d[:, None] * q.float()


def q5_1_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, 24] -> (q int8 [N, 32] in 0..31, d [N], m [N])."""
    return _q5(b[:, 4:8], b[:, 8:]).to(torch.int8), f16_value(b[:, :2]), f16_value(b[:, 2:4])


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    q, d, m = q5_1_parts(b)
    return d[:, None] * q.float() + m[:, None]


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    q, d = q8_0_parts(b)
    return q.float() * d[:, None]
