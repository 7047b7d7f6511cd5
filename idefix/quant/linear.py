"""QuantLinear: a Linear layer whose weight is held in a GGML block format.

The stored form is GGML blocks (what UQFF files carry). At construction the blocks are repacked once
into whatever the fastest kernel on the device wants:

| kernel    | GGML types           | how                                                                    |
|-----------|----------------------|------------------------------------------------------------------------|
| `q8_0`    | Q8_0, Q5_0, Q8_K,    | the native kernels (idefix/native/kernels.c, AVX-512), up to 64 rows:  |
|           | Q5_1, Q5_K (int8 x a | the blocks in registers; int8 types with fp32 activations (exact up to |
|           | scale (+ offset))    | the order of additions), 4-bit with activations rounded to int8 per    |
| `q4`      | Q4_0, Q4_1, Q4_K     | block (VNNI); more rows, a matmul on the exact fp32 weight             |
| `int4`    | Q4_0, Q4_1, Q4_K     | without the native kernels: torch's packed int4 matmul, groups of 32,  |
|           |                      | exact up to bf16 rounding of scale and zero; bf16 activations          |
| `fp16`    | every other type     | dequantized once to fp16 (2 bytes per weight), fp16 matmul: the fp16   |
|           |                      | rounding is far below any GGML type's own error                        |
| `dequant` | any type on a non-CPU | dequantize the blocks on each call, then a plain matmul: exact, slow;  |
|           | device               | `idefix bench` shows it                                                |

torch's int8 weight-only kernel was tried for Q8_0 (before the native one) and rejected: it needs one scale per
output row, and re-rounding Q8_0's 32-weight blocks to per-row scales (plus bf16 activations) erred 1.4x as much
as Q8_0 itself; `tests/unit/test_quant.py` holds every kernel to half the format's own error.

Nothing outside this package knows the scheme: the model sees an nn.Module with `forward(x)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from idefix import native
from idefix.quant.ggml import INT8_TYPES, GGMLType, dequantize, int4_groups, int8_blocks

INT4_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K})
INT4_GROUP = 32
INT4_PACK_ROWS = 64  # torch packs int4 weights in blocks of 64 output rows: only whole blocks concatenate
# Each kernel's repacked buffers, and the dimension that runs over output rows (what `concat` joins on).
BUFFERS = {
    "int4": {"packed": 0, "scales_and_zeros": 1},
    "q4": {"q4": 0, "q4_scale": 0, "q4_offset": 0},
    "q8_0": {"q8": 0, "q8_scale": 0, "q8_offset": 0},  # q8_offset: None for the types without one
    "fp16": {"fp16": 0},
    "dequant": {"data": 0},
}


def pick_kernel(qtype: GGMLType, device: torch.device) -> str:
    if device.type != "cpu":
        return "dequant"
    if qtype in INT4_TYPES:
        return "q4" if native.q4_available() else "int4"
    if qtype in INT8_TYPES and native.available():
        return "q8_0"
    return "fp16"


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W given as GGML blocks `data` (uint8 [out_features, bytes per row])."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: GGMLType,
        data: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.qtype, self.dtype = in_features, out_features, qtype, dtype
        self.kernel = pick_kernel(qtype, data.device)
        self.splits: tuple[int, ...] = (out_features,)  # out_features of each layer merged into this one (`concat`)
        self._native: native.Matmul | None = None  # the native kernel bound to this layer's buffers, once used
        # The bias may still be on `meta`: the loader assigns it when the checkpoint reaches it.
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False))
        self.bias: nn.Parameter | None
        self.packed: torch.Tensor
        self.scales_and_zeros: torch.Tensor
        self.fp16: torch.Tensor
        self.q8: torch.Tensor
        self.q8_scale: torch.Tensor
        self.q8_offset: torch.Tensor | None
        self.q4: torch.Tensor
        self.q4_scale: torch.Tensor
        self.q4_offset: torch.Tensor
        self.data: torch.Tensor
        if self.kernel == "q4":
            q, scale, offset = int4_groups(data, qtype, in_features)
            self.register_buffer("q4", native.pack_nibbles(q), persistent=False)
            scale, offset = native.pad_blocks(scale, offset)
            self.register_buffer("q4_scale", scale, persistent=False)
            self.register_buffer("q4_offset", offset, persistent=False)
        elif self.kernel == "int4":
            q, scale, offset = int4_groups(data, qtype, in_features)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # [N, K / 2]
            self.register_buffer("packed", packed, persistent=False)
            # [K / 32, N, 2]: (scale, zero) per group and output row, w = (q - 8) * scale + zero, as torch wants
            zero = offset + 8 * scale
            pairs = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            self.register_buffer("scales_and_zeros", pairs, persistent=False)
        elif self.kernel == "q8_0":
            q, scale, maybe_offset = int8_blocks(data, qtype, in_features)
            self.register_buffer("q8", q.contiguous(), persistent=False)
            self.register_buffer("q8_scale", scale.float().contiguous(), persistent=False)
            kept = None if maybe_offset is None else maybe_offset.contiguous()
            self.register_buffer("q8_offset", kept, persistent=False)
        elif self.kernel == "fp16":
            self.register_buffer("fp16", dequantize(data, qtype, in_features).half(), persistent=False)
        else:
            self.register_buffer("data", data, persistent=False)

    @classmethod
    def concat(cls, parts: list[nn.Module]) -> QuantLinear | None:
        """One layer whose output is the parts' outputs side by side (q, k, v; gate, up), so that decode makes
        one kernel call instead of several (SmolVLM-256M, Q8_0, 2 threads: 43.5 -> 46.2 tok/s, medians of 3
        alternating runs). Every output row keeps its own blocks, so the result is the parts' exactly. None
        unless the parts are QuantLinear of one type, kernel, input width, dtype and device."""
        quant = [p for p in parts if isinstance(p, QuantLinear)]
        if len(quant) != len(parts):
            return None
        first = quant[0]
        same = {(p.qtype, p.kernel, p.in_features, p.dtype, p.bias is None, p.device) for p in quant}
        if len(same) != 1 or (first.kernel == "int4" and any(p.out_features % INT4_PACK_ROWS for p in quant)):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.qtype, fused.dtype = first.in_features, first.qtype, first.dtype
        fused.out_features, fused.kernel = sum(p.out_features for p in quant), first.kernel
        fused.splits = tuple(size for p in quant for size in p.splits)
        fused._native = None
        biases: list[torch.Tensor] = [p.bias for p in quant if p.bias is not None]
        bias = nn.Parameter(torch.cat(biases), requires_grad=False) if biases else None
        fused.register_parameter("bias", bias)
        for name, dim in BUFFERS[fused.kernel].items():
            buffers = [getattr(p, name) for p in quant]  # all None or none (one type)
            joined = None if buffers[0] is None else torch.cat(buffers, dim=dim)
            fused.register_buffer(name, joined, persistent=False)
        return fused

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._native = None  # the buffers may move: bind again
        return super()._apply(fn, recurse)

    def native_spec(self) -> native.LinearSpec | None:
        """The weight as the native kernels read it, or None when another kernel serves this layer."""
        if self.kernel == "q8_0":
            return native.q8_0_spec(self.q8, self.q8_scale, self.q8_offset)
        if self.kernel == "q4":
            return native.q4_spec(self.q4, self.q4_scale, self.q4_offset, self.in_features)
        return None

    def _native_matmul(self) -> native.Matmul:
        if self._native is None:
            spec = self.native_spec()
            assert spec is not None, "only the q8_0 and q4 kernels are native"
            self._native = native.bind(spec)
        return self._native

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] as the GGML blocks define it (fp32)."""
        return dequantize(self.data, self.qtype, self.in_features)

    def _fp32_weight(self) -> torch.Tensor:
        """The native kernels' weight [out, in] in fp32, as they compute it, for many-row (compute-bound) calls."""
        if self.kernel == "q8_0":
            q = self.q8.view(self.out_features, -1, 32)
            if self.q8_offset is None:
                return (q * self.q8_scale[..., None]).view_as(self.q8)
            return torch.addcmul(self.q8_offset[..., None], q, self.q8_scale[..., None]).view_as(self.q8)
        blocks = self.in_features // 32
        q = native.unpack_nibbles(self.q4, self.in_features).view(self.out_features, blocks, 32).float()
        scale, offset = self.q4_scale[:, :blocks, None].float(), self.q4_offset[:, :blocks, None].float()
        return torch.addcmul(offset, q, scale).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~200 times a step with 2-D activations: each no-op view skipped is ~1 us saved.
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.kernel == "int4":
            out = torch._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_and_zeros
            )
        elif self.kernel in ("q8_0", "q4"):
            if flat.dtype != torch.float32 or not flat.is_contiguous():
                flat = flat.float().contiguous()
            if flat.shape[0] > native.MAX_ROWS:
                out = F.linear(flat, self._fp32_weight())
            else:
                out = self._native_matmul()(flat)
        elif self.kernel == "fp16":
            out = F.linear(flat.half(), self.fp16)
        else:
            out = F.linear(flat.to(self.dtype), self.dequantized().to(flat.device, self.dtype))
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        merged = f" ({'+'.join(map(str, self.splits))})" if len(self.splits) > 1 else ""
        return f"in={self.in_features}, out={self.out_features}{merged}, {self.qtype.name}, kernel={self.kernel}"
