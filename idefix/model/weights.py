"""Load a hub-format checkpoint into our modules: build on `meta`, then assign each tensor once.

Every tensor is checked against the module built from config.json; a missing, unexpected or
mis-shaped tensor is a `ModelLoadError` naming it and the expected shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from idefix import native
from idefix.errors import ModelLoadError
from idefix.model.config import Idefics3Config
from idefix.model.idefics3 import Idefics3Model
from idefix.model.layers import Bf16Linear
from idefix.quant.apply import TEXT_LINEAR, IsqSpec, swap_in
from idefix.quant.ggml import GGMLType, dequantize, quantize
from idefix.quant.mistralrs_uqff import is_mistralrs_uqff, read_mistralrs_uqff
from idefix.quant.uqff import SAFETENSORS_DTYPES, UqffWriter, config_digest, read_uqff

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}
LM_HEAD = "lm_head.weight"
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
TEXT_LAYER = re.compile(r"model\.text_model\.layers\.(\d+)\.")
EMBED_TOKENS = "model.text_model.embed_tokens.weight"


def resolve_dtype(name: str | torch.dtype, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """`auto` means fp32 on CPU (fast and exact there) and the checkpoint's own dtype on accelerators."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.float32 if device.type == "cpu" else checkpoint_dtype
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose auto, {', '.join(sorted(DTYPES))}") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is malformed: {exc}") from None
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        if not file.exists():
            raise ModelLoadError(f"{file} is listed in the checkpoint index but missing")
    return files


def _tensors(files: list[Path], mapped: bool) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """Every tensor of the safetensors `files` (safetensors checks each header and its offsets first).

    mapped: the tensors share the file's memory-mapped pages (no copy; an fp32 checkpoint loaded as fp32
    costs nothing extra, but every page read stays in this process's RSS while the file is open). Otherwise
    each tensor is read into memory of its own, for tensors that are quantized and dropped at once: their
    memory then goes with them, and the page cache they pass through is not this process's."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if mapped:
                    for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        yield name, file, handle.get_tensor(name)
                else:
                    yield from _read_tensors(file)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc}); re-download it") from None


def _read_tensors(file: Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """The tensors of a safetensors file that safetensors has validated, each read with plain file reads."""
    with file.open("rb") as stream:
        size = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            dtype = TORCH_DTYPES[entry["dtype"]]
            if begin == end:
                yield name, file, torch.empty(entry["shape"], dtype=dtype)
                continue
            stream.seek(8 + size + begin)
            buffer = bytearray(end - begin)
            stream.readinto(buffer)
            yield name, file, torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def _checkpoint_dtype(files: list[Path]) -> torch.dtype:
    """The dtype the checkpoint stores its first floating tensor in (read from the header only)."""
    try:
        with safe_open(str(files[0]), framework="pt", device="cpu") as handle:
            stored = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise ModelLoadError(f"{files[0]} is not a readable safetensors file ({exc}); re-download it") from None
    for code, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16)):
        if code in stored:
            return dtype
    return torch.float32


@dataclass(frozen=True)
class Weight:
    """One checked checkpoint tensor: as stored (`qtype` None), or GGML blocks of type `qtype`."""

    name: str
    data: torch.Tensor
    qtype: GGMLType | None
    shape: tuple[int, ...]


def checkpoint_weights(
    model_dir: Path, model: Idefics3Model, isq: IsqSpec | None, uqff: Sequence[Path], progress: bool
) -> Iterator[Weight]:
    """Every weight of `model` (built on `meta` from the checkpoint's config), read one at a time from the
    safetensors checkpoint in `model_dir` (or from UQFF files, idefix's or mistral.rs's), checked against the module,
    and quantized as soon as it is read when `isq` asks for it; a missing tensor is a ModelLoadError once the files
    are exhausted. Token embeddings and the LM head are always held dense: blocks stored for them are dequantized."""
    tied = model.config.tie_word_embeddings
    if uqff and any(map(is_mistralrs_uqff, uqff)):
        source = read_mistralrs_uqff(uqff)
    elif uqff:
        source = read_uqff(uqff, config_digest(model_dir))
    else:
        files = checkpoint_files(model_dir)
        tensors = _tensors(files, mapped=isq is None)  # quantized tensors are dropped as soon as they are read
        source = ((name, file, tensor, None, tuple(tensor.shape)) for name, file, tensor in tensors)
    expected = dict(model.state_dict(keep_vars=True))
    if tied:
        expected.pop(LM_HEAD)
    loaded: set[str] = set()
    desc = "Quantizing" if isq else "Loading weights"
    bar = tqdm(total=len(expected), desc=desc, unit="tensor", disable=not progress, leave=False)
    for name, file, tensor, stored, shape in source:
        if name == LM_HEAD and tied:
            continue  # tied checkpoints may still carry a copy; the embedding is the source of truth
        _check(name, file, shape, tensor, expected, stored)
        if stored and name in (EMBED_TOKENS, LM_HEAD):  # mistral.rs quantizes these too (UQFF 1.2)
            tensor, stored = dequantize(tensor, stored, shape[-1]), None
        qtype = stored or (isq.type_for(name, shape) if isq else None)
        data = quantize(tensor.float(), qtype) if qtype and not stored else tensor
        yield Weight(name, data, qtype, shape)
        loaded.add(name)
        bar.update()
    bar.close()
    missing = [f"{name} {tuple(expected[name].shape)}" for name in expected if name not in loaded]
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    isq: IsqSpec | None = None,
    uqff: Sequence[Path] = (),
    writer: UqffWriter | None = None,
    layer_devices: Sequence[str] | None = None,
) -> Idefics3Model:
    """Build the model from `model_dir/config.json` and load its weights.

    isq: quantize the chosen Linear weights while loading, each as soon as it is read, so peak memory
    stays near the quantized size plus one layer. uqff: read pre-quantized weights (and the residual)
    from these UQFF files instead of the safetensors checkpoint. writer: also hand every tensor, quantized
    or not (as the checkpoint stores it), to a UQFF writer.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    config = Idefics3Config.from_dir(model_dir)
    stored_dtype = torch.float32 if uqff else _checkpoint_dtype(checkpoint_files(model_dir))
    target = resolve_dtype(dtype, device, stored_dtype)
    with torch.device("meta"):
        model = Idefics3Model(config)
    kept_bf16: list[str] = []
    for weight in checkpoint_weights(model_dir, model, isq, uqff, progress):
        home = _home(weight.name, device, layer_devices)
        if weight.qtype is None:
            keep = target == torch.float32 and _keeps_bf16(weight, home)
            _assign(model, weight.name, weight.data.to(device=home, dtype=torch.bfloat16 if keep else target))
            if keep:
                kept_bf16.append(weight.name)
            if writer:
                writer.add_residual(weight.name, weight.data)
        else:
            swap_in(model, weight.name, weight.qtype, weight.data.to(home), target)
            if writer:
                writer.add_quantized(weight.name, weight.qtype, weight.data, weight.shape)
    for owner in (name.removesuffix(".weight") for name in kept_bf16):  # once their biases are in too
        linear = model.get_submodule(owner)
        assert isinstance(linear, nn.Linear)
        model.set_submodule(owner, Bf16Linear(linear.weight, linear.bias))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    model.model.text_model.rotary.to(device)  # the only buffer not loaded from the checkpoint
    model.model.text_model.fuse_projections()
    return model.eval().requires_grad_(False)


def _keeps_bf16(weight: Weight, home: torch.device) -> bool:
    """A bf16 text-decoder Linear weight or LM head bound for an fp32 model on the CPU stays bf16 (Bf16Linear):
    decode reads half the bytes for the same values. The vision tower keeps fp32 (its matmuls are compute-bound)."""
    linear = TEXT_LINEAR.fullmatch(weight.name) is not None or weight.name == LM_HEAD
    shape_ok = weight.data.dim() == 2 and weight.shape[-1] % 32 == 0
    fits = weight.data.dtype == torch.bfloat16 and home.type == "cpu" and native.available()
    return linear and shape_ok and fits


def quantize_checkpoint(model_dir: Path, isq: IsqSpec, writer: UqffWriter, progress: bool = True) -> None:
    """Quantize the checkpoint in `model_dir` straight into `writer`, one tensor at a time, without loading a
    model (it is built on `meta` only to check the tensors against): peak memory is one tensor and its blocks."""
    with torch.device("meta"):
        model = Idefics3Model(Idefics3Config.from_dir(model_dir))
    for weight in checkpoint_weights(model_dir, model, isq, (), progress):
        if weight.qtype is None:
            writer.add_residual(weight.name, weight.data)
        else:
            writer.add_quantized(weight.name, weight.qtype, weight.data, weight.shape)


def _home(name: str, device: torch.device, layer_devices: Sequence[str] | None) -> torch.device:
    """Where checkpoint tensor `name` lives: its text layer's device under a device map, else `device`."""
    match = TEXT_LAYER.match(name) if layer_devices else None
    return torch.device(layer_devices[int(match.group(1))]) if match and layer_devices else device


def _check(
    name: str, file: Path, shape: tuple[int, ...], tensor: torch.Tensor, expected: dict, stored: GGMLType | None
) -> None:
    if name not in expected:
        raise ModelLoadError(f"{file.name}: unexpected tensor {name!r} {shape} for this config")
    want = tuple(expected[name].shape)
    if shape != want:
        raise ModelLoadError(f"{file.name}: tensor {name!r} has shape {shape}, config.json implies {want}")
    if stored is None and not tensor.is_floating_point():
        raise ModelLoadError(f"{file.name}: tensor {name!r} has dtype {tensor.dtype}, expected a float type")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor
