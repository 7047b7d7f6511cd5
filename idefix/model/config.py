"""Model configuration read from a checkpoint's config.json.

Both layouts the hub carries are read: hub-era files (flat `rope_theta`, `rope_scaling`) and what
transformers 5 `save_pretrained` writes (`rope_parameters`). Defaults are those of the reference
configuration classes, so a key a checkpoint leaves out means what it means to transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from idefix.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    # rope_type plus that type's parameters (factor, low_freq_factor, ...), as in `rope_parameters`.
    rope: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})


@dataclass(frozen=True)
class Idefics3Config:
    vision: VisionConfig
    text: TextConfig
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False

    @property
    def image_seq_len(self) -> int:
        """Image tokens per tile after the pixel shuffle."""
        return self.vision.patches_per_side**2 // self.scale_factor**2

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Idefics3Config:
        if raw.get("model_type") not in ("idefics3", "smolvlm", None):
            raise ModelLoadError(
                f"config.json has model_type {raw.get('model_type')!r}; idefix runs Idefics3 / SmolVLM models"
            )
        text_raw = dict(raw.get("text_config") or {})
        vision_raw = dict(raw.get("vision_config") or {})
        tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
        return cls(
            vision=_build(VisionConfig, vision_raw, "vision_config"),
            text=_text_config(text_raw),
            scale_factor=int(raw.get("scale_factor", 2)),
            image_token_id=int(raw.get("image_token_id", 128257)),
            tie_word_embeddings=bool(tie),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Idefics3Config:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path} is missing; a model folder needs its config.json") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)


def _text_config(raw: dict[str, Any]) -> TextConfig:
    # The reference builds a config-less text model with rms_norm_eps 1e-5; a given dict defaults to 1e-6.
    if not raw:
        raw["rms_norm_eps"] = 1e-5
    heads = int(raw.get("num_attention_heads", TextConfig.num_attention_heads))
    raw.setdefault("num_key_value_heads", heads)
    if raw.get("head_dim") is None:
        raw["head_dim"] = int(raw.get("hidden_size", TextConfig.hidden_size)) // heads
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope.pop("type", None)
    raw["rope_theta"] = float(rope.pop("rope_theta", raw.get("rope_theta", TextConfig.rope_theta)))
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"text_config rope type {rope['rope_type']!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    raw["rope"] = rope
    return _build(TextConfig, raw, "text_config")


def _build(kind: type, raw: dict[str, Any], where: str) -> Any:
    known = {spec.name for spec in fields(kind)}
    values = {key: value for key, value in raw.items() if key in known and value is not None}
    try:
        config = kind(**values)
    except TypeError as exc:
        raise ModelLoadError(f"config.json {where} is malformed: {exc}") from None
    for spec in fields(kind):
        value = getattr(config, spec.name)
        if spec.type in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelLoadError(f"config.json {where}.{spec.name} must be a number, got {value!r}")
    return config
