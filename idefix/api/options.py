"""What to load and how: `Which`, the architecture / dtype / quantization enums, and message roles.

Names mirror the `mistralrs` Python package so a program switches by changing its import; newer mistralrs
spellings (`Which.MultimodalPlain`, `MultimodalArchitecture`) are accepted as aliases. Pure Python: importing
this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from idefix.errors import InvalidRequestError

EnumT = TypeVar("EnumT", bound=Enum)


class VisionArchitecture(Enum):
    """The model family to load. idefix runs one: Idefics3 (Idefics3-8B-Llama3 and every SmolVLM)."""

    Idefics3 = "idefics3"

    @classmethod
    def parse(cls, value: VisionArchitecture | str) -> VisionArchitecture:
        """An architecture from the enum or its name / value (case-insensitive); InvalidRequestError otherwise."""
        return _parse_enum(cls, value, "arch")


MultimodalArchitecture = VisionArchitecture
"""Newer mistralrs name of `VisionArchitecture`."""


class ModelDType(Enum):
    """Weights and compute dtype. Auto = fp32 on the CPU, the checkpoint's own dtype on a GPU."""

    Auto = "auto"
    BF16 = "bf16"
    F16 = "fp16"
    F32 = "fp32"

    @classmethod
    def parse(cls, value: ModelDType | str) -> ModelDType:
        """A dtype from the enum, its name (`BF16`) or value (`bf16`); InvalidRequestError otherwise."""
        aliases = {"f16": "fp16", "f32": "fp32", "float16": "fp16", "float32": "fp32", "bfloat16": "bf16"}
        if isinstance(value, str):
            value = aliases.get(value.lower(), value)
        return _parse_enum(cls, value, "dtype")


class IsqType(Enum):
    """In-situ quantization schemes, by their GGML names (as mistralrs's `in_situ_quant` takes them)."""

    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    Q8_0 = "Q8_0"
    Q2K = "Q2K"
    Q3K = "Q3K"
    Q4K = "Q4K"
    Q5K = "Q5K"
    Q6K = "Q6K"
    Q8K = "Q8K"

    @classmethod
    def parse(cls, value: IsqType | str) -> IsqType:
        """A scheme from the enum or its name (`"Q4K"`, `"q8_0"`); InvalidRequestError otherwise."""
        return _parse_enum(cls, value, "in_situ_quant")


class TextMessageRole(Enum):
    """Who speaks in a message (the roles the Idefics3 chat templates know)."""

    User = "user"
    Assistant = "assistant"
    System = "system"


@dataclass(frozen=True)
class VisionPlain:
    """A plain (unquantized hub-format) vision model.

    model_id: a local checkpoint folder, a Hugging Face repo id, or "demo" for the shipped demo model.
    arch: always `VisionArchitecture.Idefics3` (SmolVLM included); a string name is accepted too.
    tokenizer_json: another tokenizer.json to use (not supported yet: raises InvalidRequestError when set).
    topology: a device-mapping file (not supported yet).
    from_uqff / write_uqff: load from / write a UQFF quantized file (not supported yet).
    dtype: `ModelDType` or its name ("auto", "bf16", "fp16", "fp32").
    revision: hub branch, tag or commit (repo ids only).
    """

    model_id: str
    arch: VisionArchitecture | str = VisionArchitecture.Idefics3
    tokenizer_json: str | None = None
    topology: str | None = None
    from_uqff: str | list[str] | None = None
    write_uqff: str | None = None
    dtype: ModelDType | str = ModelDType.Auto
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise InvalidRequestError(f"model_id must be a non-empty string, got {self.model_id!r}")
        object.__setattr__(self, "arch", VisionArchitecture.parse(self.arch))
        object.__setattr__(self, "dtype", ModelDType.parse(self.dtype))


class Which:
    """Which model to load: `Which.VisionPlain(model_id=..., arch=VisionArchitecture.Idefics3)`.

    `Which.MultimodalPlain` is the same class under the newer mistralrs name.
    """

    VisionPlain = VisionPlain
    MultimodalPlain = VisionPlain


def _parse_enum(cls: type[EnumT], value: object, field: str) -> EnumT:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if value.lower() in (member.name.lower(), str(member.value).lower()):
                return member
    choices = ", ".join(member.name for member in cls)
    raise InvalidRequestError(f"{field}={value!r} is not known; choose one of {choices}")
