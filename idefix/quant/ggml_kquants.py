"""GGML's 256-element super-blocks Q2_K..Q6_K, Q8_K (ports of `quantize_row_q*_K_ref` and `dequantize_row_q*_K`).

Quantizers take x [B, 256] float32 and return [B, type_size] uint8 blocks exactly as GGUF stores them (these are
what llama.cpp writes when quantizing without an importance matrix); dequantizers follow ggml's fp32 arithmetic.
Block layouts, in storage order (d / dmin are fp16; "sub-block" = the group sharing one scale):

    Q2_K  scales[16] (lo nibble scale, hi nibble min)  qs[64]  d  dmin     16 x 16; x = d*sc*q - dmin*m, q in 0..3
    Q3_K  hmask[32]  qs[64]  scales[12] (6-bit, +32)  d                    16 x 16; x = d*(sc-32)*(q-4), q in 0..7
    Q4_K  d  dmin  scales[12] (6-bit sc + 6-bit m)  qs[128]               8 x 32;  x = d*sc*q - dmin*m, q in 0..15
    Q5_K  d  dmin  scales[12]  qh[32]  qs[128]                             8 x 32;  same, q in 0..31
    Q6_K  ql[128]  qh[64]  scales[16] (int8)  d                           16 x 16; x = d*sc*(q-32), q in 0..63
    Q8_K  d:f32  qs[256] (int8)  bsums[16] (int16 sums of 16 qs)           x = d*q

2-bit planes (Q2_K/Q3_K `qs`, Q6_K `qh`): byte 32*h + l holds elements 128*h + 32*k + l in bits 2k..2k+1.
Nibbles (Q4_K/Q5_K `qs`): byte 32*c + l holds element 64*c + l (low) and 64*c + 32 + l (high); Q6_K `ql` byte
64*h + 32*s + l holds element 128*h + 32*s + l (low) and 128*h + 64 + 32*s + l (high). High-bit planes
(Q3_K `hmask`, Q5_K `qh`): bit b of byte l is element 32*b + l.
"""

from __future__ import annotations

import torch

from idefix.quant.ggml_bits import (
    GROUP_MAX_EPS,
    const_div,
    div_const,
    f16_bytes,
    f16_value,
    f32_bytes,
    f32_value,
    first_absmax,
    nearest_int,
    pack_crumbs,
    recip,
    seq_sum,
    unpack_crumbs,
    wrap_int8,
)
from idefix.quant.ggml_ksearch import make_q3_quants, make_qkx2_quants, make_qx_quants

_U8 = torch.uint8
_SHIFTS_2BIT = torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(4, 1)  # read-only constant


def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    # [B, 256] -> element-major [n, B * 256 // n] for the searches' ordered sums
    return x.reshape(-1, n).t().contiguous()


def _ungroup(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.t().reshape(b, -1)


def _positive(v: torch.Tensor) -> torch.Tensor:
    # `max = 0; if (v > max) max = v`: the largest value, or +0.0
    return torch.where(v > 0, v, torch.zeros_like(v))


def _requant(
    x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, add: torch.Tensor | None, lo: int, hi: int
) -> torch.Tensor:
    """Second pass of every k-quant: L = clamp(nearest_int((x + add) / d), lo, hi) - lo per sub-block.

    Where d == 0 (`if (!d) continue;`) the levels of the search are kept. x, L: [B, S, n] (L already offset to
    0..hi-lo); d, add: [B, S] (the decoded fp16 super-scale times the stored sub-block scale). Returns int32.
    """
    v = x if add is None else x + add[..., None]
    new = nearest_int(v / d[..., None]).clamp(lo, hi) - lo
    return torch.where((d != 0)[..., None], new, L.to(torch.int32))


def _hbits(b: torch.Tensor) -> torch.Tensor:
    # [B, 32] high-bit plane -> [B, 256] uint8: element 32*b + l is bit b of byte l
    shifts = torch.arange(8, dtype=_U8, device=b.device).view(8, 1)
    return ((b.unsqueeze(1) >> shifts) & 1).reshape(b.shape[0], 256)


def _pack_hbits(h: torch.Tensor) -> torch.Tensor:
    # [B, 256] values 0/1 -> [B, 32]
    shifts = torch.arange(8, dtype=torch.int32, device=h.device).view(8, 1)
    return (h.view(-1, 8, 32).to(torch.int32) << shifts).sum(1).to(_U8)


def _k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """[B, 8] 6-bit scales and mins -> the 12 packed bytes that `get_scale_min_k4` reads."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)  # bytes 0..3: sc 0..3, top bits of sc 4..7
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)  # bytes 4..7: m 0..3, top bits of m 4..7
    return torch.cat([lo, mid, (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1).to(_U8)


def k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 12] packed bytes -> (sc [B, 8], m [B, 8]) as int32 (ggml's get_scale_min_k4)."""
    s = s.to(torch.int32)
    sc = torch.cat([s[:, :4] & 63, (s[:, 8:] & 0xF) | ((s[:, :4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def _quantize_kx(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared by Q4_K and Q5_K: returns (the block head d, dmin, scales[12] as bytes [B, 16], levels [B, 8, 32])."""
    b = x.shape[0]
    xt = _groups(x, 32)
    # sqrtf(sum_x2/32): torch's fp32 sqrt is not always correctly rounded on CPU; the fp64 root rounded to fp32 is
    av_x = torch.sqrt((seq_sum(xt * xt) / 32).double()).float()
    scales, mins, L = make_qkx2_quants(xt, av_x + xt.abs(), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.view(b, 8), mins.view(b, 8)
    max_scale, max_min = _positive(scales.amax(1)), _positive(mins.amax(1))
    inv_scale = torch.where(max_scale > 0, const_div(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, const_div(63.0, max_min), torch.zeros_like(max_min))
    ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp(max=63)  # uint8_t ls = ...; MIN(63, ls)
    lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp(max=63)
    d16, dmin16 = f16_bytes(div_const(max_scale, 63)), f16_bytes(div_const(max_min, 63))
    d = f16_value(d16)[:, None] * ls.float()
    dm = f16_value(dmin16)[:, None] * lm.float()
    levels = _requant(x.view(b, 8, 32), _ungroup(L, b).view(b, 8, 32), d, dm, 0, nmax)
    return torch.cat([d16, dmin16, _k4_scales(ls, lm)], dim=1), levels


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _quantize_kx(x, 15, -1.0, 20)
    q = L.view(-1, 4, 2, 32).to(_U8)
    return torch.cat([head, (q[:, :, 0] | (q[:, :, 1] << 4)).view(-1, 128)], dim=1)


def quantize_q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _quantize_kx(x, 31, -0.5, 15)
    q = L.view(-1, 4, 2, 32).to(_U8)
    ql = (q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)
    return torch.cat([head, _pack_hbits((L >> 4).view(-1, 256)), ql.view(-1, 128)], dim=1)


def quantize_q2_k(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    xt = _groups(x, 16)
    scales, mins, L = make_qkx2_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.view(b, 16), mins.view(b, 16)
    max_scale, max_min = _positive(scales.amax(1)), _positive(mins.amax(1))
    zero = torch.zeros_like(max_scale)
    ls = torch.where(max_scale[:, None] > 0, nearest_int(const_div(15.0, max_scale)[:, None] * scales), 0)
    lm = torch.where(max_min[:, None] > 0, nearest_int(const_div(15.0, max_min)[:, None] * mins), 0)
    sc = (ls & 0xFF) | ((lm << 4) & 0xFF)  # `scales[j] = l; scales[j] |= (l << 4)` in uint8
    d16 = f16_bytes(torch.where(max_scale > 0, div_const(max_scale, 15), zero))
    dmin16 = f16_bytes(torch.where(max_min > 0, div_const(max_min, 15), zero))
    d = f16_value(d16)[:, None] * (sc & 0xF).float()
    dm = f16_value(dmin16)[:, None] * (sc >> 4).float()
    levels = _requant(x.view(b, 16, 16), _ungroup(L, b).view(b, 16, 16), d, dm, 0, 3)
    qs = pack_crumbs(levels.view(b, 2, 4, 32)).view(b, 64)
    return torch.cat([sc.to(_U8), qs, d16, dmin16], dim=1)


def _q3_scale_bytes(ls: torch.Tensor) -> torch.Tensor:
    # [B, 16] 6-bit values -> 12 bytes: low nibbles of j and j + 8 share byte j % 8; the 2 high bits of j go to
    # byte 8 + j % 4 at bit 2 * (j // 4)
    hi = (ls >> 4).view(-1, 4, 4) << _SHIFTS_2BIT.to(ls.device)
    return torch.cat([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4), hi.sum(1)], dim=1).to(_U8)


def quantize_q3_k(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    scales, L = make_q3_quants(_groups(x, 16))
    scales = scales.view(b, 16)
    max_scale = first_absmax(scales, 1)
    has = max_scale != 0
    iscale = const_div(-32.0, max_scale)
    ls = wrap_int8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32  # int8_t l = ...; MAX(-32, MIN(31, l))
    ls = torch.where(has[:, None], ls, 0)
    d16 = f16_bytes(torch.where(has, recip(iscale), torch.zeros_like(iscale)))
    d = f16_value(d16)[:, None] * (ls - 32).float()
    levels = _requant(x.view(b, 16, 16), _ungroup(L, b).view(b, 16, 16), d, None, -4, 3)
    levels = levels.view(b, 256)
    qs = pack_crumbs((levels & 3).view(b, 2, 4, 32)).view(b, 64)
    return torch.cat([_pack_hbits(levels > 3), qs, _q3_scale_bytes(ls), d16], dim=1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    scales, L = make_qx_quants(_groups(x, 16), 32)
    scales = scales.view(b, 16)
    max_scale = first_absmax(scales, 1)
    iscale = const_div(-128.0, max_scale)
    d16 = f16_bytes(recip(iscale))
    sc = wrap_int8(nearest_int(iscale[:, None] * scales).clamp(max=127))  # int8_t scales[ib] = MIN(127, ...)
    d = f16_value(d16)[:, None] * sc.float()
    levels = _requant(x.view(b, 16, 16), _ungroup(L, b).view(b, 16, 16), d, None, -32, 31)
    q = levels.view(b, 2, 4, 32).to(_U8)
    lo = q & 0xF
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], dim=2).view(b, 128)
    qh = pack_crumbs(q >> 4).view(b, 64)
    out = torch.cat([ql, qh, sc.to(_U8), d16], dim=1)
    zero = (max_scale.abs() < GROUP_MAX_EPS)[:, None]  # the C code zeroes the whole block
    return torch.where(zero, torch.zeros_like(out), out)


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    mx = first_absmax(x, 1)
    has = mx != 0
    iscale = const_div(-127.0, mx)
    q = wrap_int8(nearest_int(iscale[:, None] * x).clamp(max=127))
    q = torch.where(has[:, None], q, 0)
    bsums = q.view(-1, 16, 16).sum(-1).to(torch.int16).view(_U8).view(-1, 32)
    d = torch.where(has, recip(iscale), torch.zeros_like(iscale))
    return torch.cat([f32_bytes(d), q.to(torch.int8).view(_U8), bsums], dim=1)


def _per16(scale: torch.Tensor, q: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    # scale, offset [B, S]; q [B, 256] -> scale * q (- offset) per sub-block of 256 // S
    y = scale[..., None] * q.view(q.shape[0], scale.shape[1], -1).float()
    return (y if offset is None else y - offset[..., None]).view(q.shape[0], 256)


def dequantize_q2_k(b: torch.Tensor) -> torch.Tensor:
    sc = b[:, :16]
    q = unpack_crumbs(b[:, 16:80].reshape(-1, 2, 32)).reshape(-1, 256)
    d, dmin = f16_value(b[:, 80:82])[:, None], f16_value(b[:, 82:84])[:, None]
    return _per16(d * (sc & 0xF).float(), q, dmin * (sc >> 4).float())


def dequantize_q3_k(b: torch.Tensor) -> torch.Tensor:
    s = b[:, 96:108].to(torch.int32)
    lo = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
    hi = ((s[:, 8:].unsqueeze(1) >> _SHIFTS_2BIT.to(s.device)) & 3).reshape(-1, 16)
    low = unpack_crumbs(b[:, 32:96].reshape(-1, 2, 32)).reshape(-1, 256).to(torch.int32)
    q = low - ((_hbits(b[:, :32]).to(torch.int32) ^ 1) << 2)  # a clear hmask bit means q - 4
    return _per16(f16_value(b[:, 108:110])[:, None] * ((lo | (hi << 4)) - 32).float(), q)


def q4_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, 144] -> (q uint8 [B, 256] in 0..15, d*sc f32 [B, 8], dmin*m f32 [B, 8]): x = (d*sc) * q - dmin*m."""
    sc, m = k4_scales_mins(b[:, 4:16])
    qs = b[:, 16:144].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 256)
    return q, f16_value(b[:, :2])[:, None] * sc.float(), f16_value(b[:, 2:4])[:, None] * m.float()


def dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    q, d, m = q4_k_parts(b)
    return _per16(d, q, m)


def q5_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, 176] -> (q uint8 [B, 256] in 0..31, d*sc f32 [B, 8], dmin*m f32 [B, 8]): x = (d*sc) * q - dmin*m."""
    sc, m = k4_scales_mins(b[:, 4:16])
    qs = b[:, 48:176].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 256) | (_hbits(b[:, 16:48]) << 4)
    return q, f16_value(b[:, :2])[:, None] * sc.float(), f16_value(b[:, 2:4])[:, None] * m.float()


def dequantize_q5_k(b: torch.Tensor) -> torch.Tensor:
    q, d, m = q5_k_parts(b)
    return _per16(d, q, m)


def dequantize_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, :128].reshape(-1, 2, 2, 32)
    lo = torch.cat([ql & 0xF, ql >> 4], dim=2)  # [B, 2, 4, 32]: planes in element order 0, 32, 64, 96
    hi = unpack_crumbs(b[:, 128:192].reshape(-1, 2, 32))
    q = ((lo | (hi << 4)).to(torch.int32) - 32).reshape(-1, 256)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    return _per16(f16_value(b[:, 208:210])[:, None] * sc, q)


def q8_k_parts(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 292] -> (q int8 [B, 256], d float32 [B]) (the block sums that follow are for dot products only)."""
    return b[:, 4:260].contiguous().view(torch.int8), f32_value(b[:, :4])


def dequantize_q8_k(b: torch.Tensor) -> torch.Tensor:
    q, d = q8_k_parts(b)
    return d[:, None] * q.float()
