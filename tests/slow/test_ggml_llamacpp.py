"""idefix's GGML codecs against llama.cpp itself (llama-cpp-python, built from source; `pytest -m slow`).

Three oracles: ggml's own C quantizers called through ctypes (bytes must be identical for every type),
ggml's dequantizers (bitwise), and the full `llama_model_quantize` pipeline on a GGUF file written with the
`gguf` package (RMSE within 10% of llama.cpp's, bytes identical).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from idefix.quant.ggml import GGMLType, dequantize, quantize
from tests.ggml_data import portable_weights, sha
from tests.unit.test_ggml import GOLDEN

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

K_FTYPES = {  # the llama.cpp file types whose default tensor type is each k-quant
    GGMLType.Q2_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    GGMLType.Q3_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    GGMLType.Q4_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    GGMLType.Q5_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    GGMLType.Q6_K: llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}


@pytest.fixture(scope="module")
def ggml() -> ctypes.CDLL:
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not path.exists():
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    c_i64, c_ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, c_ptr, c_ptr, c_i64, c_i64, c_i64, c_ptr]
    return lib


def _c_quantize(lib: ctypes.CDLL, w: torch.Tensor, t: GGMLType) -> torch.Tensor:
    x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // t.block_size * t.type_size), dtype=np.uint8)
    if t is GGMLType.Q8_K:  # not a storage type: ggml_quantize_chunk refuses it, the row quantizer does not
        src, dst = ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data)
        lib.quantize_row_q8_K_ref(src, dst, ctypes.c_int64(x.size))
    else:
        lib.ggml_quantize_chunk(t.value, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
    return torch.from_numpy(out)


def _c_dequantize(lib: ctypes.CDLL, data: torch.Tensor, t: GGMLType, cols: int) -> torch.Tensor:
    b = np.ascontiguousarray(data.numpy())
    out = np.zeros((b.shape[0], cols), dtype=np.float32)
    fn = getattr(lib, f"dequantize_row_{t.name.lower().replace('_k', '_K')}")
    fn(ctypes.c_void_p(b.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(out.size))
    return torch.from_numpy(out)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    outliers = torch.randn(128, 1024, generator=g)
    outliers[torch.rand(128, 1024, generator=g) < 0.01] *= 100
    return {
        "normal": torch.randn(576, 1536, generator=g) * 0.02,
        "bf16": (torch.randn(256, 2048, generator=g) * 0.02).bfloat16().float(),
        "uniform": torch.rand(128, 1024, generator=g) - 0.5,
        "heavy": torch.randn(128, 1024, generator=g) ** 3,
        "outliers": outliers,
        "sparse": torch.randn(128, 1024, generator=g) * (torch.rand(128, 1024, generator=g) < 0.05),
        "tiny": torch.randn(64, 1024, generator=g) * 1e-5,
        "portable": portable_weights(64, 2048, seed=3),
    }


TENSORS = _tensors()


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_bytes_identical_to_ggml(ggml: ctypes.CDLL, qtype: GGMLType) -> None:
    for name, w in TENSORS.items():
        ours, ref = quantize(w, qtype), _c_quantize(ggml, w, qtype)
        bad = (ours.view(-1, qtype.type_size) != ref.view(-1, qtype.type_size)).any(1)
        assert not bad.any(), f"{name}: {int(bad.sum())} of {bad.numel()} blocks differ"


@pytest.mark.parametrize("qtype", list(GGMLType), ids=lambda t: t.name)
def test_dequantize_bitwise_ggml(ggml: ctypes.CDLL, qtype: GGMLType) -> None:
    w = torch.cat([TENSORS["outliers"], TENSORS["portable"][:, :1024]])
    data = quantize(w, qtype)
    ours, ref = dequantize(data, qtype, w.shape[1]), _c_dequantize(ggml, data, qtype, w.shape[1])
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))


def test_pinned_hashes_are_llamacpp_bytes(ggml: ctypes.CDLL) -> None:
    w = portable_weights(16, 1024)
    assert {name: sha(_c_quantize(ggml, w, GGMLType[name])) for name in GOLDEN} == GOLDEN


def _write_gguf(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # a minimal llama-architecture file: llama_model_quantize reads the hyperparameters, not a full model
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(512)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    for name, w in tensors.items():
        writer.add_tensor(f"blk.0.idefix_{name}.weight", w.numpy())  # "OTHER" tensors: the ftype's default type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def source_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "f32.gguf"
    _write_gguf(path, {k: TENSORS[k] for k in ("normal", "bf16", "outliers", "heavy")})
    return path


@pytest.mark.parametrize("qtype", list(K_FTYPES), ids=lambda t: t.name)
def test_rmse_matches_llama_model_quantize(source_gguf: Path, qtype: GGMLType) -> None:
    out = source_gguf.with_name(f"{qtype.name}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = K_FTYPES[qtype]
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source_gguf).encode(), str(out).encode(), ctypes.byref(params)) == 0
    for tensor in gguf.GGUFReader(str(out)).tensors:
        w = TENSORS[tensor.name.split("_", 1)[1].removesuffix(".weight")]
        assert tensor.tensor_type.name == qtype.name, tensor.name
        ref = torch.from_numpy(np.array(tensor.data)).view(w.shape[0], -1)
        ours = quantize(w, qtype)
        rmse_ref = float((dequantize(ref, qtype, w.shape[1]) - w).pow(2).mean().sqrt())
        rmse_ours = float((dequantize(ours, qtype, w.shape[1]) - w).pow(2).mean().sqrt())
        assert rmse_ours <= 1.1 * rmse_ref, (tensor.name, rmse_ours, rmse_ref)
        assert torch.equal(ours, ref), tensor.name
