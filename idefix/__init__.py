"""idefix: fast local inference for Idefics3 / SmolVLM vision-language models.

    from idefix import Runner, Which, ChatCompletionRequest, VisionArchitecture

The public names below are imported lazily, on first use, so `import idefix` loads no torch.
See docs/python-api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "idefix.api.options": (
        "Which", "VisionPlain", "VisionArchitecture", "MultimodalArchitecture", "ModelDType", "IsqType",
        "TextMessageRole",
    ),
    "idefix.api.types": (
        "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunkResponse", "Choice", "ChunkChoice",
        "Delta", "ResponseMessage", "Usage", "Logprobs", "ResponseLogprob", "TopLogprob",
    ),
    "idefix.api.messages": ("VisionMessages",),
    "idefix.api.runner": ("Runner",),
    "idefix.api.builder": ("VisionModelBuilder", "VisionModel"),
    "idefix.media": ("MediaPolicy",),
    "idefix.errors": (
        "IdefixError", "ModelLoadError", "ImageError", "InvalidRequestError", "ContextLengthError", "OverloadedError",
    ),
    "idefix.engine.async_engine": ("EngineDeadError",),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [  # every name of _EXPORTS (a unit test checks), spelled out for linters and type checkers
    "__version__",
    "Which", "VisionPlain", "VisionArchitecture", "MultimodalArchitecture", "ModelDType", "IsqType", "TextMessageRole",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunkResponse", "Choice", "ChunkChoice",
    "Delta", "ResponseMessage", "Usage", "Logprobs", "ResponseLogprob", "TopLogprob",
    "VisionMessages", "Runner", "VisionModelBuilder", "VisionModel", "MediaPolicy",
    "IdefixError", "ModelLoadError", "ImageError", "InvalidRequestError", "ContextLengthError", "OverloadedError",
    "EngineDeadError",
]  # fmt: skip

if TYPE_CHECKING:
    from idefix.api.builder import VisionModel, VisionModelBuilder
    from idefix.api.messages import VisionMessages
    from idefix.api.options import (
        IsqType,
        ModelDType,
        MultimodalArchitecture,
        TextMessageRole,
        VisionArchitecture,
        VisionPlain,
        Which,
    )
    from idefix.api.runner import Runner
    from idefix.api.types import (
        ChatCompletionChunkResponse,
        ChatCompletionRequest,
        ChatCompletionResponse,
        Choice,
        ChunkChoice,
        Delta,
        Logprobs,
        ResponseLogprob,
        ResponseMessage,
        TopLogprob,
        Usage,
    )
    from idefix.engine.async_engine import EngineDeadError
    from idefix.errors import (
        ContextLengthError,
        IdefixError,
        ImageError,
        InvalidRequestError,
        ModelLoadError,
        OverloadedError,
    )
    from idefix.media import MediaPolicy


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'idefix' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})
