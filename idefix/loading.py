"""Everything needed to run one checkpoint, loaded once: weights, processor, generation settings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from idefix.errors import ModelLoadError
from idefix.hub import resolve_model
from idefix.model.idefics3 import Idefics3Model
from idefix.model.weights import load_model
from idefix.processing.processor import Processor


@dataclass(frozen=True)
class LoadedModel:
    """model_id: as the user named it; path: the local checkpoint folder; eos_token_ids: ids that end an
    answer (generation_config.json's eos_token_id plus the tokenizer's EOS); max_model_len: context size."""

    model_id: str
    path: Path
    model: Idefics3Model
    processor: Processor
    eos_token_ids: frozenset[int]
    max_model_len: int


def load(
    model_id: str | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load `model_id` (a folder, a hub repo id, or None / "demo" for the shipped demo model)."""
    path = resolve_model(model_id, revision=revision, token=token)
    model = load_model(path, dtype=dtype, device=device, progress=progress)
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
    )


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
