"""Everything needed to run one checkpoint, loaded once: weights, processor, generation settings."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from idefix.device_map import DevicePlan, ModelSizes, auto_plan, parse_num_device_layers, parse_topology
from idefix.errors import IdefixError, ModelLoadError
from idefix.hub import resolve_model
from idefix.model.config import Idefics3Config
from idefix.model.idefics3 import Idefics3Model
from idefix.model.weights import load_model, quantize_checkpoint
from idefix.processing.processor import Processor
from idefix.quant.apply import IsqSpec
from idefix.quant.ggml import parse_isq
from idefix.quant.linear import QuantLinear
from idefix.quant.mistralrs_uqff import RESIDUAL as MISTRALRS_RESIDUAL
from idefix.quant.uqff import Source, UqffWriter, config_digest, uqff_files


@dataclass(frozen=True)
class LoadedModel:
    """model_id: as the user named it; path: the local checkpoint folder; eos_token_ids: ids that end an
    answer (generation_config.json's eos_token_id plus the tokenizer's EOS); max_model_len: context size;
    quantization: how the weights are held, for banners ("none", "ISQ Q4_K", "UQFF Q8_0")."""

    model_id: str
    path: Path
    model: Idefics3Model
    processor: Processor
    eos_token_ids: frozenset[int]
    max_model_len: int
    quantization: str = "none"


def load(
    model_id: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
    isq: str | IsqSpec | None = None,
    from_uqff: str | Sequence[str | Path] | None = None,
    write_uqff: str | Path | None = None,
    num_device_layers: str | None = None,
    topology: str | Path | None = None,
) -> LoadedModel:
    """Load `model_id` (a folder, a hub repo id, or None / "demo" for the shipped demo model).

    isq: quantize while loading (a GGML type name such as "Q4K" or "Q8_0", or mistral.rs's shortcuts
    "4", "8", ...). from_uqff: pre-quantized UQFF files (paths, or one string with `;` between them;
    relative paths are looked up in the model folder). write_uqff: a folder to write the quantized model
    to as UQFF (a complete model folder). A folder holding *.uqff files and no safetensors (but mistral.rs's
    residual.safetensors) is read as UQFF; files written by mistral.rs are recognised and read too.
    num_device_layers / topology: a device map in mistral.rs syntax (`idefix.device_map`); a topology may
    also give text layer ranges their own ISQ type. With neither, a CUDA device gets an automatic plan when
    the model does not fit it whole.
    """
    path = resolve_model(model_id, revision=revision, token=token)
    spec = IsqSpec.parse(isq) if isinstance(isq, str) else isq
    plan = device_plan(Idefics3Config.from_dir(path), torch.device(device), isq, num_device_layers, topology)
    if plan is not None:
        print(plan.table(), file=sys.stderr)
        device = plan.main_device
        layers = {p.layer: None if p.isq is None else parse_isq(p.isq) for p in plan.layers}
        if any(layers.values()) or spec is not None:
            spec = IsqSpec(spec.qtype if spec else None, spec.vision if spec else True, layers)
    uqff = _uqff_paths(path, from_uqff)
    if uqff and spec is not None:
        raise ModelLoadError("choose either in-situ quantization (isq) or pre-quantized UQFF files, not both")
    writer = None
    if write_uqff is not None:
        if spec is None and not uqff:
            raise ModelLoadError("writing UQFF needs a quantization type (isq)")
        writer = UqffWriter(write_uqff, Source(model_id or "demo", revision, config_digest(path)))
    layer_devices = None if plan is None else [p.device for p in plan.layers]
    with writer or contextlib.nullcontext():
        model = load_model(
            path, dtype=dtype, device=device, progress=progress, isq=spec, uqff=uqff, writer=writer,
            layer_devices=layer_devices,
        )  # fmt: skip
        if writer is not None:
            writer.close(path)
    processor = Processor.from_dir(path, model.config.image_seq_len)
    tokenizer = processor.tokenizer
    image_id = tokenizer.token_to_id("<image>")
    if image_id != model.config.image_token_id:
        raise ModelLoadError(
            f"config.json image_token_id is {model.config.image_token_id} but the tokenizer's <image> is {image_id}"
        )
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.text.vocab_size}"
        )
    eos = set(_generation_eos(path))
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return LoadedModel(
        model_id=model_id or "demo",
        path=path,
        model=model,
        processor=processor,
        eos_token_ids=frozenset(eos),
        max_model_len=model.config.text.max_position_embeddings,
        quantization=_describe_quantization(model, "UQFF" if uqff else "ISQ"),
    )


def quantize_to_uqff(
    model_id: str | None,
    isq: str | IsqSpec,
    out: str | Path,
    revision: str | None = None,
    token: str | None = None,
    progress: bool = True,
) -> str:
    """Write `model_id` quantized to `isq` as a UQFF folder `out` (`idefix quantize`), one tensor at a time and
    without building a runnable model, so memory stays at one tensor; returns the GGML types used ("Q4_1+Q4_K")."""
    path = resolve_model(model_id, revision=revision, token=token)
    with UqffWriter(out, Source(model_id or "demo", revision, config_digest(path))) as writer:
        quantize_checkpoint(path, IsqSpec(parse_isq(isq)) if isinstance(isq, str) else isq, writer, progress)
        writer.close(path)
    return "+".join(sorted(writer.types))


def _generation_eos(path: Path) -> list[int]:
    file = path / "generation_config.json"
    if not file.exists():
        return []
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{file} is not a valid generation config: {exc}") from None
    if eos is None:
        return []
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) for i in ids):
        raise ModelLoadError(f"{file}: eos_token_id must be an integer or a list of integers, got {eos!r}")
    return ids


def device_plan(
    config: Idefics3Config,
    device: torch.device,
    isq: str | IsqSpec | None,
    num_device_layers: str | None,
    topology: str | Path | None,
) -> DevicePlan | None:
    """The device plan asked for, an automatic one for a CUDA device the model does not fit, or None."""
    layers = config.text.num_hidden_layers
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device.type == "cuda" else []
    isq_name = isq.qtype.name if isinstance(isq, IsqSpec) and isq.qtype else isq if isinstance(isq, str) else None
    if topology is not None:
        source = Path(topology) if Path(topology).is_file() else topology
        main = gpus[0] if gpus else "cpu"
        return parse_topology(source, layers, isq_name, main, available=gpus, valid_isq=_is_isq)
    if num_device_layers is not None:
        return parse_num_device_layers(num_device_layers, layers, gpus, isq=isq_name)
    if not gpus:
        return None
    sizes = ModelSizes.from_config(config, torch.bfloat16, isq_name)
    free = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
    plan = auto_plan(sizes, free, layers, isq=isq_name)
    return None if all(p.device == plan.main_device for p in plan.layers) else plan


def _is_isq(name: str) -> bool:
    try:
        parse_isq(name)
    except IdefixError:
        return False
    return True


def _uqff_paths(path: Path, from_uqff: str | Sequence[str | Path] | None) -> list[Path]:
    if from_uqff is None:
        has_weights = any(file.name != MISTRALRS_RESIDUAL for file in path.glob("*.safetensors"))
        return [] if has_weights else uqff_files(path)
    names = [p for p in from_uqff.split(";") if p.strip()] if isinstance(from_uqff, str) else list(from_uqff)
    files = [Path(name).expanduser() if Path(name).expanduser().is_absolute() else path / name for name in names]
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"UQFF file {file} does not exist")
    return files


def _describe_quantization(model: Idefics3Model, how: str) -> str:
    types = sorted({m.qtype.name for m in model.modules() if isinstance(m, QuantLinear)})
    return f"{how} {'+'.join(types)}" if types else "none"
