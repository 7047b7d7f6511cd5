"""Which weights in-situ quantization (ISQ) touches, and swapping their Linear for a QuantLinear.

Quantized: the Linear layers of the text decoder (q, k, v, o, gate, up, down) and, unless switched off,
of the vision encoder (q, k, v, out, fc1, fc2). Never norms, embeddings, the connector or the LM head.
A row length the type's block does not divide falls back to the nearest type that fits (`fallback_for`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from idefix.errors import InvalidRequestError
from idefix.quant.ggml import GGMLType, fallback_for, parse_isq
from idefix.quant.linear import QuantLinear

TEXT_LINEAR = re.compile(r"model\.text_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
VISION_LINEAR = re.compile(
    r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight"
)


@dataclass(frozen=True)
class IsqSpec:
    """qtype: the default type; vision: also quantize the vision encoder; text_layers: per text layer
    overrides (a topology), None meaning "leave this layer unquantized"."""

    qtype: GGMLType | None
    vision: bool = True
    text_layers: dict[int, GGMLType | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str | None, vision: bool = True) -> IsqSpec | None:
        return None if name is None else cls(parse_isq(name), vision)

    def type_for(self, name: str, shape: tuple[int, ...]) -> GGMLType | None:
        """The GGML type to store checkpoint tensor `name` in, or None to keep it as it is."""
        text = TEXT_LINEAR.fullmatch(name)
        if text is not None:
            qtype = self.text_layers.get(int(text.group(1)), self.qtype)
        elif self.vision and VISION_LINEAR.fullmatch(name):
            qtype = self.qtype
        else:
            return None
        return fallback_for(qtype, shape[-1]) if qtype is not None else None


def swap_in(model: nn.Module, weight_name: str, qtype: GGMLType, data: torch.Tensor, dtype: torch.dtype) -> None:
    """Replace the Linear owning `weight_name` by a QuantLinear holding `data` (its bias is kept)."""
    owner_name, _, leaf = weight_name.rpartition(".")
    if leaf != "weight":
        raise InvalidRequestError(f"{weight_name} is not a Linear weight")
    linear = model.get_submodule(owner_name)
    if not isinstance(linear, nn.Linear):
        raise InvalidRequestError(f"{owner_name} is not a Linear layer")
    model.set_submodule(
        owner_name, QuantLinear(linear.in_features, linear.out_features, qtype, data, linear.bias, dtype)
    )
