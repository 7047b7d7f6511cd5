"""idefix's optional native kernels for AVX-512 CPUs (idefix/native/kernels.c): Q8_0, 4-bit and bf16-weight
matrix-vector products and attention for decode, a whole decode step's decoder layers in one call (DecodeStack),
RMSNorm, and the vision tower's attention and bias + GELU.

setup.py builds them into _lib/ beside this file when it can; it is a plain shared library (no Python module),
loaded with ctypes once PyTorch is imported, so that its OpenMP loops run on PyTorch's own thread pool. Absent,
unloadable or on a CPU without AVX-512 (VNNI too for the 4-bit kernel), `available()` / `q4_available()` are
False and PyTorch's kernels serve.

A ctypes call costs a few microseconds, so the callers prepare one: a weight is described once (`LinearSpec`), `bind`
fixes it for a layer's calls, and DecodeStack runs every layer of a decode step in a single call.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

# Beyond this many rows a matmul on the widened / dequantized weight is faster (compute-bound). The quantized kernels
# read the weight once per 8 rows, the bf16 one once per 16; at 64 rows (decode x64, SmolVLM-256M) they beat the
# matmul path: 374 -> 456 tok/s with Q8_0, 299 -> 488 with Q4K, 367 -> 462 with bf16-kept weights, against a limit
# of 16 before.
MAX_ROWS = 64


class LinearSpec(ctypes.Structure):
    """A weight as kernels.c's products read it (its `Linear`): what `bind` and the decode stack call with."""

    _fields_ = [
        ("kind", ctypes.c_int64),  # BF16, Q8_0 or Q4
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("half", ctypes.c_int64),
    ]


BF16, Q8_0, Q4 = 1, 2, 3  # kernels.c's LINEAR_* kinds


class _DecodeLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("qkv", LinearSpec),
        ("o", LinearSpec),
        ("gate_up", LinearSpec),
        ("down", LinearSpec),
    ]


def _load() -> ctypes.CDLL | None:
    folder = Path(__file__).resolve().parent / "_lib"  # where setup.py builds it
    paths = [folder / f"kernels{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.exists()), None)
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if not lib.idefix_q8_0_supported():
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.idefix_linear.argtypes = [ctypes.POINTER(LinearSpec), ptr, i64, ptr, i32]
    lib.idefix_linear.restype = None
    lib.idefix_rms_norm.argtypes = [ptr, i64, i64, ptr, ctypes.c_float, ptr, i32]
    lib.idefix_rms_norm.restype = None
    lib.idefix_attention.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_float, i32]
    lib.idefix_attention.restype = i32
    lib.idefix_bias_gelu_tanh.argtypes = [ptr, i64, i64, ptr, i32]
    lib.idefix_bias_gelu_tanh.restype = None
    lib.idefix_decode_attention.argtypes = [ptr, i64, ptr, ptr, *[i64] * 7, ctypes.c_float, ptr, i32]
    lib.idefix_decode_attention.restype = i32
    layers, pools, shape, tables, where = ctypes.POINTER(_DecodeLayer), [ptr, ptr], [i64] * 6, [ptr, ptr], [i64] * 3
    lib.idefix_decode_layers.argtypes = [layers, *pools, i64, ptr, *shape, *tables, *where, ctypes.c_float, ptr, i32]
    lib.idefix_decode_layers.restype = i32
    return lib


_LIB = _load()
_threads = torch.get_num_threads


def available() -> bool:
    """The Q8_0 kernel and RMSNorm (AVX-512F/BW)."""
    return _LIB is not None


def q4_available() -> bool:
    """The 4-bit kernel (AVX-512 VNNI as well)."""
    return _LIB is not None and bool(_LIB.idefix_q4_supported())


def _library() -> ctypes.CDLL:
    if _LIB is None:
        raise RuntimeError("the native kernels are not available (see available())")
    return _LIB


Matmul = Callable[[torch.Tensor], torch.Tensor]


def bind(spec: LinearSpec) -> Matmul:
    """x fp32 [M, K] (contiguous) -> x @ W.T, fp32 [M, N], for a weight described by one of the `*_spec` functions."""
    linear, n = _library().idefix_linear, spec.n

    def matmul(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        linear(ctypes.byref(spec), x.data_ptr(), x.shape[0], y.data_ptr(), _threads())
        return y

    return matmul


def q8_0_spec(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> LinearSpec:
    """W = q * scale (+ offset) per 32-block: q int8 [N, K], scale and offset fp32 [N, K / 32]. The tensors must
    outlive the spec and stay where they are."""
    m = None if offset is None else offset.data_ptr()
    return LinearSpec(Q8_0, q.data_ptr(), scale.data_ptr(), m, q.shape[0], q.shape[1], 0)


def q4_spec(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, k: int) -> LinearSpec:
    """W = nibbles * scale + offset per 32-block, K = k columns: q uint8 [N, Kp / 2] from `pack_nibbles`, scale and
    offset [N, Kp / 32] from `pad_blocks` (both fp16 or both fp32; Kp: K rounded up to 64). The tensors must
    outlive the spec and stay where they are."""
    if scale.dtype != offset.dtype or scale.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale and offset must both be fp16 or fp32, not {scale.dtype} and {offset.dtype}")
    half = int(scale.dtype == torch.float16)
    return LinearSpec(Q4, q.data_ptr(), scale.data_ptr(), offset.data_ptr(), q.shape[0], k, half)


def bf16_spec(weight: torch.Tensor) -> LinearSpec:
    """A contiguous bf16 weight W [N, K] (K a multiple of 32), widened exactly in registers. It must outlive the
    spec and stay where it is."""
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or weight.shape[1] % 32:
        raise ValueError("the weight must be contiguous bf16 with a multiple of 32 columns")
    return LinearSpec(BF16, weight.data_ptr(), None, None, weight.shape[0], weight.shape[1], 0)


class DecodeStack:
    """A text decoder's layers for one decode step in one native call (kernels.c's idefix_decode_layers), for steps
    whose rows fill a range of slots at one context length. Each layer: its two RMSNorm weights (fp32), the specs
    of its merged q/k/v, o, merged gate/up and down products, in that order (no biases, SiLU); the tensors must
    outlive the stack and stay where they are."""

    def __init__(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor, Sequence[LinearSpec]]],
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
    ) -> None:
        self._layers = (_DecodeLayer * len(layers))(
            *(_DecodeLayer(a.data_ptr(), b.data_ptr(), *specs) for a, b, specs in layers)
        )
        _, _, (_, o, _, down) = layers[0]
        self.hidden, self.intermediate = o.n, down.k
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        width = (heads + 2 * kv_heads) * head_dim
        self._per_row = 2 * self.hidden + width + heads * head_dim + 3 * self.intermediate
        self._buffers = threading.local()  # kernels.c's scratch, one per thread (engines may share a model)

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        pools: tuple[list[torch.Tensor], list[torch.Tensor]],
        first_slot: int,
        context: int,
    ) -> None:
        """x fp32 [rows, hidden] in place, row b the new token of slot first_slot + b at position context - 1;
        cos, signed_sin [rows, head_dim] (Rotary's); pools: each layer's K and V, [slots, Hkv, max_len, D] fp32."""
        rows = x.shape[0]
        slots, _, max_len, _ = pools[0][0].shape
        tables_ok = all(t.shape == (rows, self.head_dim) and t.is_contiguous() for t in (cos, signed_sin))
        if x.shape[1] != self.hidden or not x.is_contiguous() or x.dtype != torch.float32 or not tables_ok:
            raise ValueError("x must be contiguous fp32 [rows, hidden] and the rotary tables [rows, head_dim]")
        if rows > MAX_ROWS or first_slot + rows > slots or context > max_len:
            raise ValueError(f"{rows} rows from slot {first_slot} over {context} positions do not fit")
        if len(pools[0]) != len(self._layers) or len(pools[1]) != len(self._layers):
            raise ValueError(f"{len(self._layers)} layers need as many K and V pools")
        for pool in (*pools[0], *pools[1]):
            if not pool.is_contiguous() or pool.dtype != torch.float32 or pool.shape != pools[0][0].shape:
                raise ValueError("the KV pools must be contiguous fp32 [slots, Hkv, max_len, D], all alike")
        pointers = [(ctypes.c_void_p * len(p))(*(t.data_ptr() for t in p)) for p in pools]
        scratch = getattr(self._buffers, "scratch", None)
        if scratch is None or scratch.numel() < rows * self._per_row + self.head_dim:
            scratch = self._buffers.scratch = torch.empty(rows * self._per_row + self.head_dim)  # grown, then kept
        shape = (rows, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate)
        where = (first_slot, max_len, context)
        tables, out = (cos.data_ptr(), signed_sin.data_ptr()), x.data_ptr()
        lib, buffer = _library(), scratch.data_ptr()
        if lib.idefix_decode_layers(
            self._layers, *pointers, len(self._layers), out, *shape, *tables, *where, self.eps, buffer, _threads()
        ):
            raise MemoryError("the native decode attention could not allocate its buffer")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, weight.shape, weight, eps) for contiguous fp32 x [..., n] and weight [n] on the CPU."""
    y = torch.empty_like(x)
    n = x.shape[-1]
    _library().idefix_rms_norm(x.data_ptr(), x.numel() // n, n, weight.data_ptr(), eps, y.data_ptr(), _threads())
    return y


ATTENTION_MAX_HEAD_DIM = 80  # SigLIP's 64 (SmolVLM-256M / 500M) and 72 (so400m: SmolVLM, Idefics3-8B)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked attention per head, fp32 on the CPU: q, k, v [B, T, H, D] (D <= ATTENTION_MAX_HEAD_DIM, each
    with unit stride in D and one token stride, e.g. views of projections' [B, T, H * D] outputs) ->
    softmax(scale * q k^T) v as [B, T, H * D], the layout the output projection takes."""
    batch, t, heads, d = q.shape
    stride = q.stride(1)
    if k.shape != q.shape or v.shape != q.shape or any(x.stride() != (t * stride, stride, d, 1) for x in (q, k, v)):
        raise ValueError("q, k and v must be [B, T, H, D] with rows of one stride and heads side by side")
    out = torch.empty(batch, t, heads * d, dtype=torch.float32)
    pointers = (x.data_ptr() for x in (q, k, v, out))
    if _library().idefix_attention(*pointers, batch, t, heads, d, stride, heads * d, scale, _threads()):
        raise MemoryError("the native attention kernel could not allocate its buffers")
    return out


def decode_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, first_slot: int, context: int
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for one query row per slot of first_slot, first_slot + 1, ..., over each slot's
    first `context` cached positions, grouped-query, fp32 on the CPU: q [B, H, D] (heads side by side, rows any
    distance apart), pools [slots, Hkv, max_len, D] contiguous -> [B, H, D]."""
    batch, heads, d = q.shape
    slots, kv_heads, max_len, _ = k_pool.shape
    if q.stride()[1:] != (d, 1) or not (k_pool.is_contiguous() and v_pool.is_contiguous()) or heads % kv_heads:
        raise ValueError("q must be [B, H, D] with heads side by side and the pools contiguous [slots, Hkv, L, D]")
    if first_slot + batch > slots or context > max_len:
        raise ValueError(f"rows in slots {first_slot}..{first_slot + batch - 1} over {context} positions do not fit")
    out = torch.empty(batch, heads, d, dtype=torch.float32)
    shape = (first_slot, batch, heads, kv_heads, max_len, context, d)
    pools = (k_pool.data_ptr(), v_pool.data_ptr())
    if _library().idefix_decode_attention(
        q.data_ptr(), q.stride(0), *pools, *shape, d**-0.5, out.data_ptr(), _threads()
    ):
        raise MemoryError("the native decode attention could not allocate its buffer")
    return out


def bias_gelu_tanh_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x = gelu(x + bias, approximate="tanh") in place, in one pass, for contiguous fp32 x [..., n] and bias [n]."""
    n = x.shape[-1]
    if not x.is_contiguous() or bias.shape != (n,) or not bias.is_contiguous():
        raise ValueError("x must be contiguous and bias one contiguous row as long as x's")
    _library().idefix_bias_gelu_tanh(x.data_ptr(), x.numel() // n, n, bias.data_ptr(), _threads())
    return x


def pad_blocks(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale and offset [N, K / 32] (fp32) with zero blocks appended up to a whole number of pairs (the
    4-bit layout), both in fp16 if that holds every value exactly, else both fp32."""
    padded = [F.pad(v, (0, v.shape[1] % 2)).contiguous() for v in (scale, offset)]
    half = [v.half() for v in padded]
    exact = all(torch.equal(h.float(), v) for h, v in zip(half, padded, strict=True))
    return (half[0], half[1]) if exact else (padded[0], padded[1])


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] in 0..15 -> [N, Kp / 2], Kp = K rounded up to 64 (zeros): per pair of 32-blocks, 32 bytes
    holding the first block in their low nibbles and the second in their high ones (what kernels.c reads)."""
    q = F.pad(q, (0, -q.shape[1] % 64))
    pairs = q.view(q.shape[0], -1, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [N, Kp / 2] -> uint8 [N, cols]."""
    pairs = packed.view(packed.shape[0], -1, 1, 32)
    return torch.cat([pairs & 0x0F, pairs >> 4], dim=2).reshape(packed.shape[0], -1)[:, :cols]
