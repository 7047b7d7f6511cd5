"""GGML block formats: bytes identical to the `gguf` package's reference quantizers (legacy types), dequantization
bit-identical to gguf's for every type, the int4 / int8 views, error ordering, type names and fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idefix.errors import InvalidRequestError
from idefix.quant import ggml
from idefix.quant.ggml import GGMLType, dequantize, fallback_for, int4_groups, int8_blocks, parse_isq, quantize
from tests.ggml_data import portable_weights, sha

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

LEGACY = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0]
K_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]

# sha256[:16] of quantize(portable_weights(16, 1024), t); the same tensor quantized by llama.cpp's
# ggml_quantize_chunk gives the same bytes (tests/slow/test_ggml_llamacpp.py checks this).
GOLDEN = {
    "Q2_K": "50f4f73461548184",
    "Q3_K": "40aa7fe8b5055b75",
    "Q4_K": "bc1c6c06baee8c0c",
    "Q5_K": "130b9d048ffe17b1",
    "Q6_K": "19f36d8f82240ad7",
    "Q8_K": "22b8621c325bff8d",
}


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(24, 1024, generator=g) * 0.02
    uniform = torch.rand(24, 1024, generator=g) * 2 - 1
    outliers = torch.randn(24, 1024, generator=g)
    outliers[torch.rand(24, 1024, generator=g) < 0.01] *= 100
    return {"normal": normal, "uniform": uniform, "outliers": outliers, "special": portable_weights(24, 1024)}


CASES = _cases()


def _gguf_type(t: GGMLType):
    return getattr(gguf.GGMLQuantizationType, t.name)


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(CASES))
def test_legacy_bytes_match_gguf(qtype: GGMLType, case: str) -> None:
    w = CASES[case]
    ours = quantize(w, qtype)
    assert ours.shape == (w.shape[0], w.shape[1] // 32 * qtype.type_size) and ours.dtype == torch.uint8
    np.testing.assert_array_equal(ours.numpy(), gq.quantize(w.numpy(), _gguf_type(qtype)))


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576)])
def test_legacy_bytes_match_gguf_on_model_shapes(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.02
    for qtype in (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q5_1):
        np.testing.assert_array_equal(quantize(w, qtype).numpy(), gq.quantize(w.numpy(), _gguf_type(qtype)))


@pytest.mark.parametrize("qtype", [t for t in GGMLType if t is not GGMLType.Q8_K], ids=lambda t: t.name)
def test_dequantize_is_bitwise_gguf(qtype: GGMLType) -> None:
    w = torch.cat([CASES["outliers"][:8], CASES["special"][:8], CASES["normal"][:8]])
    data = quantize(w, qtype)
    ours = dequantize(data, qtype, w.shape[1])
    ref = gq.dequantize(data.numpy(), _gguf_type(qtype))
    np.testing.assert_array_equal(ours.numpy().view(np.int32), ref.view(np.int32))


def test_q8_k_layout() -> None:
    w = CASES["special"]
    data = quantize(w, GGMLType.Q8_K).view(-1, 292)
    d = data[:, :4].contiguous().view(torch.float32)
    q = data[:, 4:260].contiguous().view(torch.int8)
    bsums = data[:, 260:].contiguous().view(torch.int16)
    assert torch.equal(bsums, q.view(-1, 16, 16).sum(-1).to(torch.int16))
    assert torch.equal(dequantize(data.view(w.shape[0], -1), GGMLType.Q8_K, w.shape[1]).view(-1, 256), d * q.float())


@pytest.mark.parametrize("qtype", K_TYPES + [GGMLType.Q8_K], ids=lambda t: t.name)
def test_k_quant_bytes_pinned(qtype: GGMLType) -> None:
    assert sha(quantize(portable_weights(16, 1024), qtype)) == GOLDEN[qtype.name]


@pytest.mark.parametrize("qtype", [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K], ids=lambda t: t.name)
def test_int4_groups_reconstruct_dequantize(qtype: GGMLType) -> None:
    w = torch.cat([CASES["normal"], CASES["uniform"], CASES["outliers"]])
    data = quantize(w, qtype)
    q, scale, offset = int4_groups(data, qtype, w.shape[1])
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert scale.shape == offset.shape == (w.shape[0], w.shape[1] // 32)
    rebuilt = q.float().view(w.shape[0], -1, 32) * scale[..., None] + offset[..., None]
    assert torch.equal(rebuilt.view_as(w), dequantize(data, qtype, w.shape[1]))


@pytest.mark.parametrize(
    "qtype", [GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q8_K, GGMLType.Q5_1, GGMLType.Q5_K], ids=lambda t: t.name
)
def test_int8_blocks_reconstruct_dequantize(qtype: GGMLType) -> None:
    w = CASES["outliers"]
    data = quantize(w, qtype)
    q, scale, offset = int8_blocks(data, qtype, w.shape[1])
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0], w.shape[1] // 32)
    rebuilt = q.float().view(w.shape[0], -1, 32) * scale[..., None]
    if offset is not None:
        rebuilt = rebuilt + offset[..., None]
    assert (offset is None) == (qtype in (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q8_K))
    assert torch.equal(rebuilt.view_as(w), dequantize(data, qtype, w.shape[1]))


def test_error_order_on_normal_weights() -> None:
    w = torch.randn(128, 1536, generator=torch.Generator().manual_seed(2)) * 0.02
    rmse = {t: float((dequantize(quantize(w, t), t, w.shape[1]) - w).pow(2).mean().sqrt()) for t in GGMLType}
    order = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
             GGMLType.Q8_0]  # fmt: skip
    for worse, better in zip(order, order[1:], strict=False):
        assert rmse[worse] > 1.1 * rmse[better], (worse.name, better.name, rmse)
    assert rmse[GGMLType.Q4_1] < rmse[GGMLType.Q4_0] and rmse[GGMLType.Q5_1] < rmse[GGMLType.Q5_0]
    assert rmse[GGMLType.Q8_K] < rmse[GGMLType.Q6_K] and rmse[GGMLType.Q2_K] < 0.4 * 0.02


def test_chunking_does_not_change_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    w = CASES["special"][:7]
    types = (GGMLType.Q4_1, GGMLType.Q3_K, GGMLType.Q4_K)
    whole = {t: quantize(w, t) for t in types}
    restored = {t: dequantize(whole[t], t, w.shape[1]) for t in types}
    monkeypatch.setattr(ggml, "CHUNK_WEIGHTS", 3 * 1024)  # 3 rows at a time, the last chunk short
    for t in types:
        assert torch.equal(quantize(w, t), whole[t])
        assert torch.equal(dequantize(whole[t], t, w.shape[1]), restored[t])


def test_sizes_and_ids() -> None:
    assert [t.value for t in GGMLType] == [2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15]
    for t in GGMLType:
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[_gguf_type(t)]
        assert t.value == _gguf_type(t).value
    assert GGMLType.Q4_K.bits_per_weight == 4.5


def test_bad_shapes_and_values() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(torch.zeros(2, 96), GGMLType.Q4_K)
    with pytest.raises(ValueError, match="NaN"):
        quantize(torch.tensor([[float("nan")] * 32]), GGMLType.Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        dequantize(torch.zeros(2, 17, dtype=torch.uint8), GGMLType.Q4_0, 32)
    with pytest.raises(ValueError, match="Q4_0, Q4_1 or Q4_K"):
        int4_groups(torch.zeros(1, 34, dtype=torch.uint8), GGMLType.Q8_0, 32)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("Q4K", GGMLType.Q4_K), ("q4_k", GGMLType.Q4_K), ("Q4_K", GGMLType.Q4_K), ("4", GGMLType.Q4_K),
     ("2", GGMLType.Q2_K), ("3", GGMLType.Q3_K), ("5", GGMLType.Q5_K), ("6", GGMLType.Q6_K), ("8", GGMLType.Q8_0),
     ("Q8_0", GGMLType.Q8_0), ("q4_0", GGMLType.Q4_0), ("Q5_1", GGMLType.Q5_1), ("Q8K", GGMLType.Q8_K),
     (" q6k ", GGMLType.Q6_K)],
)  # fmt: skip
def test_parse_isq(name: str, expected: GGMLType) -> None:
    assert parse_isq(name) is expected


@pytest.mark.parametrize("name", ["Q7K", "7", "", "F16", "HQQ4", "Q4_K_M"])
def test_parse_isq_rejects_unknown(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K"):
        parse_isq(name)


def test_fallback_for() -> None:
    assert fallback_for(GGMLType.Q4_K, 1536) is GGMLType.Q4_K
    assert fallback_for(GGMLType.Q4_K, 576) is GGMLType.Q4_1  # 576 = 18 * 32, not a multiple of 256
    assert fallback_for(GGMLType.Q5_K, 576) is GGMLType.Q5_1
    assert fallback_for(GGMLType.Q6_K, 576) is GGMLType.Q8_0
    assert fallback_for(GGMLType.Q2_K, 576) is GGMLType.Q4_0
    assert fallback_for(GGMLType.Q3_K, 576) is GGMLType.Q4_0
    assert fallback_for(GGMLType.Q8_K, 576) is GGMLType.Q8_0
    assert fallback_for(GGMLType.Q8_0, 576) is GGMLType.Q8_0
    assert fallback_for(GGMLType.Q4_K, 100) is None and fallback_for(GGMLType.Q4_0, 48) is None
