"""GGML block quantization types: names, ids, sizes, the fallback rule, and row-wise quantize / dequantize.

A quantized [R, C] weight is a uint8 tensor [R, C // block_size * type_size]: each row is its blocks back to back,
exactly as a GGUF file stores the tensor. The per-format codecs live in `ggml_legacy` (32-element blocks) and
`ggml_kquants` (256-element super-blocks); this module chunks rows so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch

from idefix.errors import InvalidRequestError
from idefix.quant import ggml_kquants as kq
from idefix.quant import ggml_legacy as lg


class GGMLType(Enum):
    """The GGML block formats idefix supports; values are ggml's `ggml_type` ids."""

    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15

    @property
    def block_size(self) -> int:
        """Weights per block: 32 for the legacy types, 256 for the k-quants."""
        return _SIZES[self][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return _SIZES[self][1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
}

Codec = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], int]
# (encode blocks, decode blocks, weights per encode call). The k-quant searches loop over candidate scales (and
# Q3_K over elements) with whole-piece vector ops: pieces this size measured fastest (big enough to amortize
# per-op overhead, small enough to stay in cache; Q6_K evaluates its 19 candidates at once, so it wants less).
_KQ_PIECE = 1 << 17
_CODECS: dict[GGMLType, Codec] = {
    GGMLType.Q4_0: (lg.quantize_q4_0, lg.dequantize_q4_0, 1 << 22),
    GGMLType.Q4_1: (lg.quantize_q4_1, lg.dequantize_q4_1, 1 << 22),
    GGMLType.Q5_0: (lg.quantize_q5_0, lg.dequantize_q5_0, 1 << 22),
    GGMLType.Q5_1: (lg.quantize_q5_1, lg.dequantize_q5_1, 1 << 22),
    GGMLType.Q8_0: (lg.quantize_q8_0, lg.dequantize_q8_0, 1 << 22),
    GGMLType.Q2_K: (kq.quantize_q2_k, kq.dequantize_q2_k, _KQ_PIECE),
    GGMLType.Q3_K: (kq.quantize_q3_k, kq.dequantize_q3_k, 1 << 20),
    GGMLType.Q4_K: (kq.quantize_q4_k, kq.dequantize_q4_k, _KQ_PIECE),
    GGMLType.Q5_K: (kq.quantize_q5_k, kq.dequantize_q5_k, _KQ_PIECE),
    GGMLType.Q6_K: (kq.quantize_q6_k, kq.dequantize_q6_k, 1 << 15),
    GGMLType.Q8_K: (kq.quantize_q8_k, kq.dequantize_q8_k, 1 << 22),
}

# `--isq` spellings, after upper-casing and dropping "_": Q4K == q4_k == Q4_K; digits as mistral.rs maps them.
_ISQ_NAMES: dict[str, GGMLType] = {t.name.replace("_", ""): t for t in GGMLType}
_ISQ_NAMES.update(
    {
        "2": GGMLType.Q2_K,
        "3": GGMLType.Q3_K,
        "4": GGMLType.Q4_K,
        "5": GGMLType.Q5_K,
        "6": GGMLType.Q6_K,
        "8": GGMLType.Q8_0,
    }
)
ISQ_CHOICES = "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K, or 2, 3, 4, 5, 6, 8"

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp) for rows that are not a multiple of 256. llama.cpp has no
# fallback for Q8_K (it is not a file type there); Q8_0 is the nearest 32-block type.
_FALLBACK = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q4_1,  # llama.cpp: Q5_0; 4-bit stays 4-bit here, keeping the fast 4-bit kernels
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
    GGMLType.Q8_K: GGMLType.Q8_0,
}

# Rows are converted to fp32 (and dequantized) in chunks of about this many weights: 16 MiB of fp32.
CHUNK_WEIGHTS = 1 << 22


def parse_isq(name: str) -> GGMLType:
    """`"Q4K"`, `"q4_k"`, `"Q4_K"`, `"4"` -> GGMLType.Q4_K; raises InvalidRequestError naming the valid choices."""
    key = str(name).strip().upper().replace("_", "")
    if key not in _ISQ_NAMES:
        raise InvalidRequestError(f"unknown quantization type {name!r}; choose one of {ISQ_CHOICES}")
    return _ISQ_NAMES[key]


def fallback_for(qtype: GGMLType, cols: int) -> GGMLType | None:
    """The type a row of `cols` weights gets when `qtype` asks for it; None means leave the tensor unquantized.

    Like llama.cpp, a k-quant whose 256-block does not divide the row falls back to a 32-block type
    (Q2_K/Q3_K -> Q4_0, Q5_K -> Q5_1, Q6_K -> Q8_0) and if 32 does not divide it either, the tensor is not
    quantized. One difference: Q4_K falls back to Q4_1 (asymmetric 4-bit, like Q4_K), not to llama.cpp's
    Q5_0, so a 4-bit request stays 4-bit and keeps the fast 4-bit kernels (SmolVLM's 576-wide rows need this).
    """
    if cols % qtype.block_size == 0:
        return qtype
    target = _FALLBACK.get(qtype, qtype)
    return target if cols % target.block_size == 0 else None


def _rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_WEIGHTS // max(cols, 1))


def quantize(weight: torch.Tensor, qtype: GGMLType) -> torch.Tensor:
    """[R, C] float weight -> uint8 [R, C // block_size * type_size], rows of GGML blocks (GGUF's layout).

    Computes in fp32 on the weight's device, `CHUNK_WEIGHTS` at a time; bit-identical to ggml's reference
    quantizers. Raises ValueError for a shape that does not fit the type (see `fallback_for`) or non-finite values.
    """
    if weight.dim() != 2 or weight.shape[1] % qtype.block_size != 0:
        raise ValueError(
            f"cannot quantize a tensor of shape {tuple(weight.shape)} to {qtype.name}: "
            f"need 2 dims with the last a multiple of {qtype.block_size}"
        )
    rows, cols = weight.shape
    encode, _, piece = _CODECS[qtype]
    out = torch.empty(rows, cols // qtype.block_size * qtype.type_size, dtype=torch.uint8, device=weight.device)
    blocks_out = out.view(-1, qtype.type_size)
    step = _rows_per_chunk(cols)
    for r0 in range(0, rows, step):
        x = weight[r0 : r0 + step].to(torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError(f"cannot quantize to {qtype.name}: the tensor has NaN or infinite values")
        b0 = r0 * cols // qtype.block_size
        for i, blocks in enumerate(x.reshape(-1, qtype.block_size).split(piece // qtype.block_size)):
            start = b0 + i * (piece // qtype.block_size)
            blocks_out[start : start + blocks.shape[0]] = encode(blocks)
    return out


def dequantize(data: torch.Tensor, qtype: GGMLType, cols: int) -> torch.Tensor:
    """uint8 [R, nbytes] rows of GGML blocks -> float32 [R, cols], bit-identical to ggml's dequantize_row_*."""
    _check_bytes(data, qtype, cols)
    decode = _CODECS[qtype][1]
    out = torch.empty(data.shape[0], cols, dtype=torch.float32, device=data.device)
    step = _rows_per_chunk(cols)
    for r0 in range(0, data.shape[0], step):
        b = data[r0 : r0 + step]
        out[r0 : r0 + b.shape[0]] = decode(b.reshape(-1, qtype.type_size)).view(b.shape[0], cols)
    return out


def _check_bytes(data: torch.Tensor, qtype: GGMLType, cols: int) -> None:
    if cols % qtype.block_size != 0 or data.dtype != torch.uint8 or data.dim() != 2:
        raise ValueError(f"{qtype.name} data must be uint8 [R, nbytes] with cols a multiple of {qtype.block_size}")
    if data.shape[1] != cols // qtype.block_size * qtype.type_size:
        raise ValueError(
            f"{qtype.name} rows of {cols} weights take {cols // qtype.block_size * qtype.type_size} "
            f"bytes, got {data.shape[1]}"
        )


def int4_groups(data: torch.Tensor, qtype: GGMLType, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K rows -> (q uint8 [R, C] in 0..15, scale f32 [R, C//32], offset f32 [R, C//32]).

    w = q * scale + offset, rounded once, is dequantize() exactly: q * scale is exact in fp32 for all three
    (an fp16 scale, or Q4_K's fp16 x 6-bit sub-block scale, times a 4-bit q), and GGML rounds only the sum.
    Q4_0 (x = d * (q - 8)): offset = -8 * d. Q4_1 (x = d * q + m): offset = m. Q4_K (x = d * q - m): offset = -m.
    """
    _check_bytes(data, qtype, cols)
    rows = data.shape[0]
    blocks = data.reshape(-1, qtype.type_size)
    if qtype is GGMLType.Q4_0:
        q, d = lg.q4_0_parts(blocks)
        offset = -8 * d
    elif qtype is GGMLType.Q4_1:
        q, d, offset = lg.q4_1_parts(blocks)
    elif qtype is GGMLType.Q4_K:
        q, d, m = kq.q4_k_parts(blocks)  # per 32-element sub-block: x = d * q - m
        offset = -m
    else:
        raise ValueError(f"int4_groups needs Q4_0, Q4_1 or Q4_K, not {qtype.name}")
    return q.reshape(rows, cols), d.reshape(rows, -1), offset.reshape(rows, -1)


INT8_TYPES = frozenset({GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q8_K, GGMLType.Q5_1, GGMLType.Q5_K})


def int8_blocks(
    data: torch.Tensor, qtype: GGMLType, cols: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q8_0 / Q5_0 / Q8_K / Q5_1 / Q5_K rows -> (q int8 [R, C], scale f32 [R, C//32], offset f32 [R, C//32] or
    None) with w = q * scale (+ offset), rounded once, exactly equal to dequantize(): q * scale is exact in fp32 for
    all of them (Q5_0 as q - 16; Q8_K's one scale per 256 repeated for each of its 32-blocks; Q5_1 x = d * q + m,
    Q5_K x = d * q - m per 32)."""
    _check_bytes(data, qtype, cols)
    blocks = data.reshape(-1, qtype.type_size)
    m = None
    if qtype is GGMLType.Q8_0:
        q, d = lg.q8_0_parts(blocks)
    elif qtype is GGMLType.Q5_0:
        q, d = lg.q5_0_parts(blocks)
    elif qtype is GGMLType.Q8_K:
        q, d = kq.q8_k_parts(blocks)
        d = d.repeat_interleave(8)
    elif qtype is GGMLType.Q5_1:
        q, d, m = lg.q5_1_parts(blocks)
    elif qtype is GGMLType.Q5_K:
        q, d, m = kq.q5_k_parts(blocks)
        q, m = q.to(torch.int8), -m
    else:
        raise ValueError(f"int8_blocks needs Q8_0, Q5_0, Q8_K, Q5_1 or Q5_K, not {qtype.name}")
    offset = None if m is None else m.reshape(data.shape[0], -1)
    return q.reshape(data.shape[0], cols), d.reshape(data.shape[0], -1), offset
