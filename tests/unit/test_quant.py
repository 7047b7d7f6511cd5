"""In-situ quantization: fast kernels against dequantize-then-matmul, quantized models against the
unquantized one, and UQFF files written, read back and refused when broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.quant_agreement import prompt_logits
from idefix import native
from idefix.engine.engine import Engine
from idefix.errors import IdefixError, ModelLoadError
from idefix.generate import generate
from idefix.loading import load
from idefix.model.weights import _tensors, checkpoint_files, quantize_checkpoint
from idefix.quant.apply import IsqSpec
from idefix.quant.ggml import INT8_TYPES, GGMLType, dequantize, quantize
from idefix.quant.linear import QuantLinear
from idefix.quant.uqff import RESIDUAL, Source, UqffWriter, config_digest
from idefix.sampling import SamplingParams
from tests.checkpoints import WIDE, build_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16)
TEXT = [{"type": "text", "text": "Describe the picture in one sentence, please."}]
MESSAGES = [{"role": "user", "content": TEXT}]


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(WIDE, tmp_path_factory.mktemp("wide") / "model")


@pytest.mark.parametrize("qtype", list(GGMLType))
def test_kernel_matches_dequantize_then_matmul(qtype: GGMLType) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 512, generator=gen) * 0.05
    x = torch.randn(5, 512, generator=gen)
    data = quantize(weight, qtype)
    layer = QuantLinear(512, 96, qtype, data, None, torch.float32)
    reference = x @ dequantize(data, qtype, 512).t()
    quant_error = (reference - x @ weight.t()).norm()
    kernel_error = (layer(x) - reference).norm()
    # The int4 and fp16 kernels round activations: small next to the quantization itself.
    assert kernel_error <= 0.5 * quant_error, f"{layer.kernel}: {kernel_error:.4g} vs {quant_error:.4g}"
    if layer.kernel in ("dequant", "q8_0"):
        assert kernel_error <= 1e-4 * reference.norm()


def rounded_per_block(x: torch.Tensor) -> torch.Tensor:
    """x as the 4-bit kernel sees it: each 32-block rounded to int8 steps of max|block| / 127."""
    blocks = x.view(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / step) * step).view_as(x)


@pytest.mark.skipif(not native.available(), reason="the native kernels are not built or the CPU lacks AVX-512")
# 544: an odd number of 32-blocks, padded to pairs for 4-bit (Q4_K rows are whole 256-weight super-blocks)
@pytest.mark.parametrize(
    ("qtype", "cols"),
    [(t, 1024) for t in (*sorted(INT8_TYPES, key=lambda t: t.value), GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q4_K)]
    + [(t, 544) for t in (GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_0, GGMLType.Q4_1)],
    ids=str,
)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 40])
def test_native_kernels_are_dequantize_then_matmul(qtype: GGMLType, rows: int, cols: int) -> None:
    """Up to 16 rows the native kernel, beyond them a matmul on the dequantized weight, in fp32: only the order of
    the additions differs from dequantize-then-matmul, and for 4-bit (up to 16 rows) x's rounding to int8 per
    block, as llama.cpp rounds it."""
    int8 = qtype in INT8_TYPES
    if not int8 and not native.q4_available():
        pytest.skip("the CPU lacks AVX-512 VNNI")
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(200, cols, generator=gen) * 0.05
    x = torch.randn(rows, cols, generator=gen)
    data = quantize(weight, qtype)
    bias = torch.randn(200, generator=gen)
    layer = QuantLinear(cols, 200, qtype, data, bias, torch.float32)
    assert layer.kernel == ("q8_0" if int8 else "q4")
    if qtype in (GGMLType.Q4_0, GGMLType.Q4_1):  # their fp16 scales and offsets stay fp16: 20 bytes a block
        assert layer.q4_scale.dtype == layer.q4_offset.dtype == torch.float16
    seen = rounded_per_block(x) if layer.kernel == "q4" and rows <= native.MAX_ROWS else x
    reference = seen @ dequantize(data, qtype, cols).t() + bias
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "qtype", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q5_0, GGMLType.Q5_K]
)
@pytest.mark.parametrize("rows", [1, 20])
def test_merged_layers_compute_exactly_what_the_parts_do(qtype: GGMLType, rows: int) -> None:
    """QuantLinear.concat (q/k/v and gate/up at load): the parts' outputs side by side, bit for bit."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 512, generator=gen)
    parts = []
    for out in (128, 64, 64):
        data = quantize(torch.randn(out, 512, generator=gen) * 0.05, qtype)
        parts.append(QuantLinear(512, out, qtype, data, torch.randn(out, generator=gen), torch.float32))
    merged = QuantLinear.concat(parts)
    assert merged is not None and merged.splits == (128, 64, 64) and merged.kernel == parts[0].kernel
    assert torch.equal(merged(x), torch.cat([p(x) for p in parts], dim=-1))


def test_only_layers_of_one_kind_merge() -> None:
    gen = torch.Generator().manual_seed(2)

    def layer(out: int, qtype: GGMLType, bias: bool = False) -> QuantLinear:
        data = quantize(torch.randn(out, 256, generator=gen), qtype)
        return QuantLinear(256, out, qtype, data, torch.zeros(out) if bias else None, torch.float32)

    assert QuantLinear.concat([layer(64, GGMLType.Q8_0), layer(64, GGMLType.Q4_0)]) is None
    assert QuantLinear.concat([layer(64, GGMLType.Q8_0), layer(64, GGMLType.Q8_0, bias=True)]) is None
    assert QuantLinear.concat([layer(64, GGMLType.Q8_0), torch.nn.Linear(256, 64)]) is None


def test_pytorch_kernels_serve_without_the_native_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler at install, or no AVX-512: Q8_0 runs as fp16 and the 4-bit types on torch's int4 kernel,
    whose packing in blocks of 64 output rows decides what merges."""
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "q4_available", lambda: False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=gen)
    for qtype, kernel in [
        (GGMLType.Q8_0, "fp16"),
        (GGMLType.Q5_0, "fp16"),
        (GGMLType.Q4_0, "int4"),
        (GGMLType.Q4_1, "int4"),
        (GGMLType.Q4_K, "int4"),
    ]:
        weight = torch.randn(64, 256, generator=gen) * 0.05
        data = quantize(weight, qtype)
        layer = QuantLinear(256, 64, qtype, data, None, torch.float32)
        assert layer.kernel == kernel
        reference = x @ dequantize(data, qtype, 256).t()
        assert (layer(x) - reference).norm() <= 0.5 * (reference - x @ weight.t()).norm()

    def int4(out: int) -> QuantLinear:
        return QuantLinear(
            256, out, GGMLType.Q4_0, quantize(torch.randn(out, 256, generator=gen), GGMLType.Q4_0), None, torch.float32
        )

    assert QuantLinear.concat([int4(32), int4(64)]) is None
    merged = QuantLinear.concat([int4(64), int4(128)])
    assert merged is not None and merged.kernel == "int4"


def test_isq_spec_picks_layers_and_falls_back() -> None:
    spec = IsqSpec(GGMLType.Q4_K, vision=False, text_layers={1: None})
    assert spec.type_for("model.text_model.layers.0.mlp.down_proj.weight", (64, 512)) is GGMLType.Q4_K
    assert spec.type_for("model.text_model.layers.0.self_attn.q_proj.weight", (64, 576)) is GGMLType.Q4_1
    assert spec.type_for("model.text_model.layers.1.self_attn.q_proj.weight", (64, 512)) is None
    assert spec.type_for("model.vision_model.encoder.layers.0.mlp.fc1.weight", (64, 512)) is None
    assert spec.type_for("model.text_model.embed_tokens.weight", (64, 512)) is None
    assert spec.type_for("lm_head.weight", (64, 512)) is None
    assert spec.type_for("model.text_model.layers.0.mlp.down_proj.weight", (64, 40)) is None  # no block fits


@pytest.mark.parametrize("isq", ["Q8_0", "Q6K", "Q5_0", "Q4K", "Q4_0", "Q3K"])
def test_quantized_model_equals_the_model_with_quantized_weights(wide: Path, isq: str) -> None:
    """ISQ quantizes exactly the chosen layers, keeps biases and runs kernels true to the blocks: its logits
    match the original model with those weights replaced by their dequantized blocks."""
    full, quant = load(str(wide), progress=False), load(str(wide), progress=False, isq=isq)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    prompt = Engine(full).prepare([{"role": "user", "content": [{"type": "image", "image": image}, *TEXT]}])
    original = prompt_logits(full, prompt, prompt.token_ids)
    spec = IsqSpec.parse(isq)
    assert spec is not None
    swapped = 0
    with torch.no_grad():
        for name, param in full.model.named_parameters():
            qtype = spec.type_for(name, tuple(param.shape))
            if qtype is not None:
                param.copy_(dequantize(quantize(param.float(), qtype), qtype, param.shape[1]))
                swapped += 1
    assert swapped == 2 * 7 + 2 * 6  # text and vision Linear layers of both blocks
    assert sum(len(m.splits) for m in quant.model.modules() if isinstance(m, QuantLinear)) == swapped
    reference = prompt_logits(full, prompt, prompt.token_ids)
    quant_effect = (reference - original).abs().max()
    assert quant_effect > 0
    # the last tokens one at a time, so that decode's kernels (a few rows) are held to it as well as prefill's
    decoded = prompt_logits(quant, prompt, prompt.token_ids, decode_from=len(prompt.token_ids) - 4)
    assert (decoded - reference).abs().max() <= 0.5 * quant_effect


def test_uqff_round_trip_gives_identical_tokens(wide: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4k"
    isq_model = load(str(wide), progress=False, isq="Q4K", write_uqff=out)
    expected = generate(Engine(isq_model), MESSAGES, GREEDY).token_ids
    assert sorted(p.name for p in out.glob("*.uqff")) == ["model-00001-of-00001.uqff", RESIDUAL]
    assert (out / "README.md").exists() and (out / "tokenizer.json").exists()
    from_folder = load(str(out), progress=False)
    assert generate(Engine(from_folder), MESSAGES, GREEDY).token_ids == expected
    files = "model-00001-of-00001.uqff;" + str(out / RESIDUAL)
    from_flag = load(str(wide), progress=False, from_uqff=files.replace("model-", str(out) + "/model-", 1))
    assert generate(Engine(from_flag), MESSAGES, GREEDY).token_ids == expected


def _tensors_and_tables(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors, tables = {}, {}
    for file in sorted(folder.glob("*.uqff")):
        with safe_open(str(file), framework="pt") as handle:
            tables.update(json.loads(handle.metadata()["tensors"]))
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors, tables


def test_quantize_command_writes_what_isq_loading_writes(wide: Path, tmp_path: Path) -> None:
    load(str(wide), progress=False, isq="Q4K", write_uqff=tmp_path / "loaded")
    out = subprocess.run(
        [sys.executable, "-m", "idefix", "quantize", "-m", str(wide), "--isq", "4", "-o", str(tmp_path / "cmd")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"wrote a Q4_K UQFF of {wide} to {tmp_path / 'cmd'} in ")
    loaded, loaded_tables = _tensors_and_tables(tmp_path / "loaded")
    written, written_tables = _tensors_and_tables(tmp_path / "cmd")
    assert written_tables == loaded_tables and written.keys() == loaded.keys()
    assert all(torch.equal(written[name], loaded[name]) for name in loaded)
    # The residual keeps the checkpoint's own dtype (it is converted when loaded, as the checkpoint would be).
    with safe_open(str(wide / "model.safetensors"), framework="pt") as handle:
        assert written["model.text_model.norm.weight"].dtype == handle.get_tensor("model.text_model.norm.weight").dtype


def test_reading_tensors_for_quantization_gives_the_mapped_tensors(wide: Path, tmp_path: Path) -> None:
    # ISQ reads each tensor into its own memory (no lasting mmap pages); it must see exactly what safetensors maps.
    mixed = tmp_path / "mixed.safetensors"
    save_file(
        {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(6, dtype=torch.int64), "e": torch.empty(0, 4)}, mixed
    )
    files = [*checkpoint_files(wide), mixed]
    mapped = {name: t for name, _, t in _tensors(files, mapped=True)}
    read = {name: t for name, _, t in _tensors(files, mapped=False)}
    assert mapped.keys() == read.keys()
    assert all(read[n].dtype == mapped[n].dtype and torch.equal(read[n], mapped[n]) for n in mapped)


def test_uqff_shards_at_the_size_limit(wide: Path, tmp_path: Path) -> None:
    reference = load(str(wide), progress=False, isq="Q8_0")
    writer = UqffWriter(tmp_path / "q8", Source("wide", None, config_digest(wide)), shard_bytes=2**20)
    quantize_checkpoint(wide, IsqSpec.parse("Q8_0"), writer, progress=False)
    files = writer.close(wide)
    shards = sorted(p.name for p in (tmp_path / "q8").glob("model-*.uqff"))
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.uqff"
    assert not list((tmp_path / "q8").glob("*.part")) and len(files) == len(shards) + 1
    sizes = [(tmp_path / "q8" / name).stat().st_size for name in shards]
    assert max(sizes) < 2**20 + 2 * 2**20  # a shard closes as soon as it passes the limit
    reread = load(str(tmp_path / "q8"), progress=False)
    expected = generate(Engine(reference), MESSAGES, GREEDY).token_ids
    assert generate(Engine(reread), MESSAGES, GREEDY).token_ids == expected


def test_failed_quantize_leaves_no_weight_files(wide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "q8"
    writer = UqffWriter(out, Source("wide", None, config_digest(wide)), shard_bytes=2**20)

    def add_then_fail(name: str, *args: object) -> None:
        if writer.shards:  # interrupted with one shard done, the residual and a second shard open
            raise KeyboardInterrupt
        UqffWriter.add_quantized(writer, name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(writer, "add_quantized", add_then_fail)
    with pytest.raises(KeyboardInterrupt), writer:
        quantize_checkpoint(wide, IsqSpec.parse("Q8_0"), writer, progress=False)
    assert writer.shards and not [p.name for p in out.iterdir() if p.suffix in (".uqff", ".part")]


def _rewrite(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("breakage", ["truncated", "checksum", "other-model", "version", "type"])
def test_broken_uqff_is_one_clear_error(wide: Path, tmp_path: Path, breakage: str) -> None:
    out = tmp_path / "q8"
    load(str(wide), progress=False, isq="Q8_0", write_uqff=out)
    shard = out / "model-00001-of-00001.uqff"
    if breakage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1000])
        message = "truncated"
    elif breakage == "checksum":

        def flip_a_byte(meta: dict, tensors: dict) -> None:
            flat = next(iter(tensors.values())).view(-1)
            flat[0] = (int(flat[0]) + 1) % 256

        _rewrite(shard, flip_a_byte)
        message = "checksum"
    elif breakage == "other-model":
        config = json.loads((out / "config.json").read_text())
        config["text_config"]["rms_norm_eps"] = 1e-3
        (out / "config.json").write_text(json.dumps(config))
        message = "another model"
    elif breakage == "version":
        _rewrite(shard, lambda meta, tensors: meta.__setitem__("uqff_version", "99"))
        message = "version '99'"
    else:

        def unknown_type(meta: dict, tensors: dict) -> None:
            table = json.loads(meta["tensors"])
            next(iter(table.values()))["type"] = "IQ2_XXS"
            meta["tensors"] = json.dumps(table)

        _rewrite(shard, unknown_type)
        message = "IQ2_XXS"
    with pytest.raises(ModelLoadError, match=message) as info:
        load(str(out), progress=False)
    assert "uqff" in str(info.value)


def test_topology_with_mixed_quantization_equals_the_same_isq_spec(wide: Path, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    topology.write_text("0-1:\n  isq: Q8_0\n1-2:\n  isq: Q4K\n")
    mapped = load(str(wide), progress=False, topology=topology)
    direct = load(str(wide), progress=False, isq=IsqSpec(None, True, {0: GGMLType.Q8_0, 1: GGMLType.Q4_K}))
    kinds = {name: module.qtype for name, module in mapped.model.named_modules() if isinstance(module, QuantLinear)}
    assert kinds["model.text_model.layers.0.mlp.gate_up_proj"] is GGMLType.Q8_0  # gate and up, merged at load
    assert kinds["model.text_model.layers.1.mlp.gate_up_proj"] is GGMLType.Q4_K
    assert not any(name.startswith("model.vision_model") for name in kinds)  # no global --isq: vision stays
    assert generate(Engine(mapped), MESSAGES, GREEDY).token_ids == generate(Engine(direct), MESSAGES, GREEDY).token_ids


def test_bad_device_maps_are_one_clear_error(wide: Path, tmp_path: Path) -> None:
    with pytest.raises(IdefixError, match="places 3 layers but the model has 2"):
        load(str(wide), progress=False, num_device_layers="cpu:3")
    with pytest.raises(IdefixError, match="overlaps"):
        load(str(wide), progress=False, topology="0-2:\n  isq: Q8_0\n1-2:\n  isq: Q4K\n")
    with pytest.raises(IdefixError, match="unknown ISQ"):
        load(str(wide), progress=False, topology="0-1:\n  isq: Q9\n")
