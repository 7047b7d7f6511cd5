"""The native kernels that are not quantized products (those are in test_quant.py): RMSNorm, the vision tower's
attention and bias + GELU, and the 4-bit layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idefix import native
from idefix.model.layers import Bf16Linear, RMSNorm

needs_native = pytest.mark.skipif(not native.available(), reason="the native kernels are not built or no AVX-512")


@needs_native
@pytest.mark.parametrize("rows", [1, 3, 100])  # 100: past the row count where the threads share the rows
@pytest.mark.parametrize("size", [576, 100, 7])  # 100 and 7: a part-filled last vector
def test_native_rms_norm_is_torchs(rows: int, size: int) -> None:
    gen = torch.Generator().manual_seed(rows * size)
    x = torch.randn(rows, size, generator=gen) * 3
    weight = torch.randn(size, generator=gen)
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-5), F.rms_norm(x, (size,), weight, 1e-5))


@needs_native
@pytest.mark.parametrize("rows", [1, 4, 5, 11, 16, 21, 64, 100])  # 100: past the native kernel's rows, a matmul
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out", [80, 81, 1])  # weight rows go in pairs past 4 rows of x: odd counts too
def test_bf16_linear_is_the_fp32_linear_of_its_weight(rows: int, bias: bool, out: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(out, 96, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(out, generator=gen) if bias else None
    layer = Bf16Linear(weight, b)
    x = torch.randn(rows, 96, generator=gen)
    expected = F.linear(x, weight.float(), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # the order of additions only
    torch.testing.assert_close(layer(x.view(1, rows, 96))[0], expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_merged_bf16_linears_give_their_parts_outputs_side_by_side() -> None:
    gen = torch.Generator().manual_seed(0)
    parts = [Bf16Linear(torch.randn(n, 64, generator=gen).bfloat16(), torch.randn(n, generator=gen)) for n in (48, 16)]
    merged = Bf16Linear.concat(parts)  # type: ignore[arg-type]
    assert merged is not None and merged.splits == (48, 16)
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(merged(x), torch.cat([p(x) for p in parts], dim=-1))
    assert Bf16Linear.concat([parts[0], torch.nn.Linear(64, 8)]) is None


@needs_native
def test_rms_norm_layer_on_contiguous_and_strided_input() -> None:
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 5, 64)
    reference = F.rms_norm(x, (64,), norm.weight, 1e-6)
    torch.testing.assert_close(norm(x), reference)
    torch.testing.assert_close(norm(x.transpose(0, 1)), reference.transpose(0, 1))  # not contiguous: torch's


@needs_native
@pytest.mark.parametrize(
    ("batch", "t", "heads", "d"),
    [(2, 1024, 2, 64), (1, 729, 3, 72), (3, 64, 2, 64), (2, 37, 3, 20), (1, 1, 1, 8), (1, 100, 1, 80), (5, 33, 1, 16)],
)  # SigLIP's 64 and 72 wide heads on whole tiles; part-filled key blocks, query blocks and vectors; one token
def test_native_attention_is_sdpa(batch: int, t: int, heads: int, d: int) -> None:
    gen = torch.Generator().manual_seed(t * d)
    qkv = torch.randn(batch, t, 3, heads * d, generator=gen) * 2  # q, k, v: strided views of one projection
    q, k, v = (qkv[:, :, i].view(batch, t, heads, d) for i in range(3))

    def sdpa(*qkv: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in qkv))
        return out.transpose(1, 2).reshape(batch, t, heads * d).double()

    exact = sdpa(q.double(), k.double(), v.double())
    torch_error = (sdpa(q, k, v) - exact).abs().max().item()
    error = (native.attention(q, k, v, d**-0.5).double() - exact).abs().max().item()
    assert error <= 2 * torch_error + 1e-6  # as close to the fp64 result as PyTorch's own fp32 kernel


@needs_native
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "context", "d"),
    [(1, 9, 3, 37, 64), (4, 8, 8, 200, 16), (2, 4, 1, 1, 24), (1, 9, 3, 1200, 64), (3, 6, 2, 16, 72)]
    + [(1, 2, 1, 33, 96)],
)
def test_native_decode_attention_is_sdpa(batch: int, heads: int, kv_heads: int, context: int, d: int) -> None:
    gen = torch.Generator().manual_seed(context * d)
    pools = [torch.randn(batch + 2, kv_heads, max(256, context), d, generator=gen) * 2 for _ in range(2)]
    merged = torch.randn(batch, heads + 2 * kv_heads, d, generator=gen) * 2  # q: a slice of a merged q/k/v output
    q = merged[:, :heads]

    def sdpa(*tensors: torch.Tensor) -> torch.Tensor:
        query, keys, values = tensors
        return F.scaled_dot_product_attention(query[:, :, None], keys, values, enable_gqa=True)[:, :, 0].double()

    keys, values = (pool[1 : 1 + batch, :, :context] for pool in pools)  # rows in slots 1..batch
    exact = sdpa(q.double(), keys.double(), values.double())
    torch_error = (sdpa(q, keys, values) - exact).abs().max().item()
    error = (native.decode_attention(q, *pools, 1, context).double() - exact).abs().max().item()
    assert error <= 2 * torch_error + 1e-6


@needs_native
def test_native_attention_rejects_other_layouts() -> None:
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="heads side by side"):
        native.attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), 0.25)


@needs_native
@pytest.mark.parametrize(("rows", "n"), [(1, 7), (100, 3072), (3, 37)])  # 100: threaded rows; 7, 37: part vectors
def test_native_bias_gelu_is_torchs(rows: int, n: int) -> None:
    gen = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=gen) * 8  # tails too: GELU(-20) underflows, GELU(20) is 20
    bias = torch.randn(n, generator=gen)
    z = x + bias
    exact = F.gelu(z.double(), approximate="tanh")
    torch_error = (F.gelu(z, approximate="tanh").double() - exact).abs().max().item()
    error = (native.bias_gelu_tanh_(x.clone(), bias).double() - exact).abs().max().item()
    assert error <= 2 * torch_error + 1e-6


@pytest.mark.parametrize("cols", [64, 96, 544])
def test_nibble_layout_round_trips(cols: int) -> None:
    q = torch.randint(0, 16, (5, cols), dtype=torch.uint8)
    packed = native.pack_nibbles(q)
    assert packed.shape == (5, -(-cols // 64) * 32)
    assert torch.equal(native.unpack_nibbles(packed, cols), q)
