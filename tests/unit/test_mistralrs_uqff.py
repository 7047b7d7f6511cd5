"""UQFF files written by mistral.rs itself (its `mistralrs` Python package, on CPU), read by idefix.

mistral.rs quantizes through candle: its legacy blocks (Q4_0 ... Q8_0) are llama.cpp's bit for bit, as idefix's
are, but its K-quants use the older `make_qkx1_quants` search, so its Q4_K / Q6_K bytes differ from idefix's
while decoding to weights just as close to the originals.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from benchmarks.quant_agreement import prompt_logits
from idefix.engine.engine import Engine
from idefix.errors import ModelLoadError
from idefix.loading import LoadedModel, load
from idefix.model.weights import _tensors, checkpoint_files
from idefix.quant.ggml import GGMLType, dequantize, quantize
from idefix.quant.linear import QuantLinear
from idefix.quant.mistralrs_uqff import read_mistralrs_uqff
from tests.checkpoints import WIDE, build_checkpoint

pytest.importorskip("mistralrs")

WRITE = """
import sys, mistralrs
model, isq, out = sys.argv[1:]
which = mistralrs.Which.MultimodalPlain(model_id=model, arch=mistralrs.MultimodalArchitecture.Idefics3, write_uqff=out)
mistralrs.Runner(which=which, in_situ_quant=isq, no_paged_attn=True)
"""
SHARD = "model-0.uqff"  # mistral.rs names shard K of `write_uqff=model.uqff` model-K.uqff
LAYER = "model.text_model.layers.0.mlp.down_proj"
VISION_LAYER = "model.vision_model.encoder.layers.0.mlp.fc1"  # one with a bias
LINEARS = 2 * 7 + 2 * 6  # text and vision Linear layers of both blocks


@pytest.fixture(scope="module")
def wide_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # hub-era config.json: mistral.rs requires the flat `rope_theta` transformers 5 no longer writes
    return build_checkpoint(replace(WIDE, hub_era=True), tmp_path_factory.mktemp("wide") / "model")


def _mistralrs_export(checkpoint: Path, isq: str, out: Path) -> Path:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAYON_NUM_THREADS": "1"}
    command = [sys.executable, "-c", WRITE, str(checkpoint), isq, str(out / "model.uqff")]
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=300)
    return out


@pytest.fixture(scope="module")
def q8_0(wide_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mistralrs_export(wide_hub, "Q8_0", tmp_path_factory.mktemp("mistralrs-q8_0"))


@pytest.fixture(scope="module")
def q4k(wide_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mistralrs_export(wide_hub, "Q4K", tmp_path_factory.mktemp("mistralrs-q4k"))


def _blocks(export: Path) -> dict[str, tuple[torch.Tensor, GGMLType, tuple[int, ...]]]:
    """The GGML blocks of every quantized tensor in the export, by checkpoint name."""
    entries = read_mistralrs_uqff([export / SHARD])
    return {name: (data, qtype, shape) for name, _, data, qtype, shape in entries if qtype is not None}


def _originals(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, _, tensor in _tensors(checkpoint_files(checkpoint), mapped=True)}


def _image_prompt_logits(loaded: LoadedModel, reference: LoadedModel) -> torch.Tensor:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the picture, please."}]
    prompt = Engine(reference).prepare([{"role": "user", "content": content}])
    return prompt_logits(loaded, prompt, prompt.token_ids)


def test_q8_0_blocks_are_the_blocks_idefix_makes(wide_hub: Path, q8_0: Path) -> None:
    originals, blocks = _originals(wide_hub), _blocks(q8_0)
    assert len(blocks) == LINEARS + 2  # and the token embeddings and the LM head (UQFF 1.2)
    for name, (data, qtype, _) in blocks.items():
        assert qtype is GGMLType.Q8_0
        assert torch.equal(data, quantize(originals[name], qtype)), name


def test_q8_0_file_gives_the_logits_of_idefix_isq(wide_hub: Path, q8_0: Path) -> None:
    from_mistralrs = load(str(q8_0), progress=False)  # the export folder is a complete model
    assert from_mistralrs.quantization == "UQFF Q8_0"
    isq = load(str(wide_hub), progress=False, isq="Q8_0")
    with torch.no_grad():  # idefix's ISQ keeps these two dense; the file holds them as Q8_0, read back dense
        for param in (isq.model.model.text_model.embed_tokens.weight, isq.model.lm_head.weight):
            param.copy_(dequantize(quantize(param, GGMLType.Q8_0), GGMLType.Q8_0, param.shape[1]))
    assert torch.equal(_image_prompt_logits(from_mistralrs, isq), _image_prompt_logits(isq, isq))


def test_q4k_file_holds_faithful_blocks_and_loads_with_from_uqff(wide_hub: Path, q4k: Path) -> None:
    """The Q4_K (layers) and Q6_K (embeddings, LM head) blocks decode to weights as close to the originals as
    idefix's own blocks do, and the model read from them (residual.safetensors found beside the named shard)
    computes with exactly those weights."""
    originals, blocks = _originals(wide_hub), _blocks(q4k)
    assert {qtype for _, qtype, _ in blocks.values()} == {GGMLType.Q4_K, GGMLType.Q6_K}
    for name in (f"{LAYER}.weight", "lm_head.weight"):
        data, qtype, shape = blocks[name]
        own = dequantize(quantize(originals[name], qtype), qtype, shape[1])
        error = (dequantize(data, qtype, shape[1]) - originals[name]).norm()
        assert error <= 1.25 * (own - originals[name]).norm(), name
    full = load(str(wide_hub), progress=False)
    original = _image_prompt_logits(full, full)
    with torch.no_grad():
        for name, (data, qtype, shape) in blocks.items():
            full.model.get_parameter(name).copy_(dequantize(data, qtype, shape[1]))
    reference = _image_prompt_logits(full, full)
    loaded = load(str(wide_hub), progress=False, from_uqff=str(q4k / SHARD))
    assert sum(len(m.splits) for m in loaded.model.modules() if isinstance(m, QuantLinear)) == LINEARS
    quant_effect = (reference - original).abs().max()
    assert (_image_prompt_logits(loaded, full) - reference).abs().max() <= 0.5 * quant_effect


def test_unquantized_and_float_fallback_layers_load_dense(q8_0: Path, tmp_path: Path) -> None:
    """The two ways mistral.rs stores a layer it did not quantize: an unquantized entry (format 1, the float
    tensor itself) and a GGML entry of ggml type F32 (raw float bytes); both load as plain Linear weights."""
    folder = shutil.copytree(q8_0, tmp_path / "export")
    tensors = load_file(folder / SHARD)
    weights = {}
    for key in (LAYER, VISION_LAYER):
        shape = tuple(tensors.pop(f"{key}.weight.shape").tolist())
        weights[key] = dequantize(tensors[f"{key}.weight"].view(shape[0], -1), GGMLType.Q8_0, shape[1])
    tensors.pop(f"{LAYER}.weight.dtype")
    tensors[f"{LAYER}.weight.format"] = torch.tensor(1, dtype=torch.uint8)
    tensors[f"{LAYER}.weight"] = weights[LAYER]
    tensors[f"{VISION_LAYER}.weight.dtype"] = torch.tensor(0, dtype=torch.uint32)
    tensors[f"{VISION_LAYER}.weight.shape"] = torch.tensor(weights[VISION_LAYER].shape, dtype=torch.uint32)
    tensors[f"{VISION_LAYER}.weight"] = weights[VISION_LAYER].view(torch.uint8).reshape(-1)
    save_file(tensors, folder / SHARD)
    model = load(str(folder), progress=False).model
    for key, weight in weights.items():
        assert torch.equal(model.get_parameter(f"{key}.weight"), weight), key
    assert sum(len(m.splits) for m in model.modules() if isinstance(m, QuantLinear)) == LINEARS - 2


def _edit_shard(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / SHARD)
        change(tensors)
        save_file(tensors, folder / SHARD)

    return edit


def _hqq_layer(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{LAYER}.weight.format"] = torch.tensor(2, dtype=torch.uint8)


def _next_major_version(tensors: dict[str, torch.Tensor]) -> None:
    tensors["uqff.version.major"] = torch.tensor(2, dtype=torch.uint32)


def _no_version(tensors: dict[str, torch.Tensor]) -> None:
    for key in ("uqff.version.major", "uqff.version.minor", "uqff.version.patch"):
        del tensors[key]


def _lost_block(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{LAYER}.weight"] = tensors[f"{LAYER}.weight"][: -GGMLType.Q8_0.type_size]


def _truncate_residual(folder: Path) -> None:
    data = (folder / "residual.safetensors").read_bytes()
    (folder / "residual.safetensors").write_bytes(data[: len(data) // 2])


def _drop_residual(folder: Path) -> None:
    (folder / "residual.safetensors").unlink()


def _second_shard_set(folder: Path) -> None:
    shutil.copyfile(folder / SHARD, folder / "other-0.uqff")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_shard(_hqq_layer), f"layer '{LAYER}' is a mistral.rs HQQ layer"),
        (_edit_shard(_next_major_version), r"mistral.rs UQFF 2\.2\.0; idefix reads UQFF 1\.0 to 1\.2"),
        (_edit_shard(_no_version), "neither an idefix UQFF file .* nor a mistral.rs UQFF 1.x shard"),
        (_edit_shard(_lost_block), rf"layer '{LAYER}' holds .* bytes of Q8_0 \[256, 512\]; the file is corrupt"),
        (_truncate_residual, "residual.safetensors is not a readable mistral.rs UQFF file"),
        (_drop_residual, "residual.safetensors is missing"),
        (_second_shard_set, "is stored twice; name one quantization's shards with --from-uqff"),
    ],
    ids=["hqq", "newer-major", "pre-1.0", "lost-block", "truncated-residual", "no-residual", "two-shard-sets"],
)
def test_broken_or_unsupported_files_give_one_clear_error(
    q8_0: Path, tmp_path: Path, edit: Callable[[Path], None], message: str
) -> None:
    folder = shutil.copytree(q8_0, tmp_path / "export")
    edit(folder)
    with pytest.raises(ModelLoadError, match=message):
        load(str(folder), progress=False)
