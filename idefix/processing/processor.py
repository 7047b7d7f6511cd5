"""Messages + images -> a model-ready prompt: token ids with every `<image>` expanded, and the image tiles.

Glues the chat template, the image processor and the tokenizer together the way
`Idefics3Processor` does, reading the same files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from idefix.errors import InvalidRequestError, ModelLoadError
from idefix.processing.image import ImageBatch, ImageProcessor
from idefix.processing.prompt import ChatTemplate, encode_prompt, expand_image_tokens
from idefix.processing.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    """token_ids: the full prompt; images: the tiles of every image in prompt order (None without images)."""

    token_ids: list[int]
    images: ImageBatch | None


def image_sources(messages: object) -> list[Any]:
    """The image of each image part (`image_url.url` or `image`), in the order the prompt shows them."""
    sources: list[Any] = []
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        return sources  # the template's message checks report the problem
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str) or not isinstance(content, Sequence):
            continue
        for part in content:
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "image_url" and isinstance(part.get("image_url"), Mapping):
                sources.append(part["image_url"].get("url"))
            elif part.get("type") == "image":
                sources.append(part.get("image"))
    return sources


class Processor:
    def __init__(
        self, template: ChatTemplate, tokenizer: Tokenizer, image_processor: ImageProcessor, image_seq_len: int
    ) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_seq_len = image_seq_len

    @classmethod
    def from_dir(cls, model_dir: str | Path, image_seq_len: int) -> Processor:
        """`image_seq_len` comes from the model config; processor_config.json must agree when it names one."""
        model_dir = Path(model_dir)
        declared = _processor_config(model_dir).get("image_seq_len")
        if declared is not None and declared != image_seq_len:
            raise ModelLoadError(
                f"processor_config.json in {model_dir} says image_seq_len {declared}, but config.json implies "
                f"{image_seq_len} image tokens per tile"
            )
        return cls(
            ChatTemplate.from_dir(model_dir),
            Tokenizer.from_dir(model_dir),
            ImageProcessor.from_dir(model_dir),
            image_seq_len,
        )

    def __call__(self, messages: object, images: Sequence[Image.Image]) -> Prompt:
        """Render `messages` (OpenAI style) with `images`, one per image part, already loaded."""
        text = self.template.render(messages, add_generation_prompt=True)
        if not images:
            return Prompt(self.encode(text, [], []), None)
        batch = self.image_processor(images)
        return Prompt(self.encode(text, batch.rows, batch.cols), batch)

    def encode(self, text: str, rows: Sequence[int], cols: Sequence[int]) -> list[int]:
        ids = encode_prompt(self.tokenizer, expand_image_tokens(text, rows, cols, self.image_seq_len))
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids


def _processor_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "processor_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    return config if isinstance(config, dict) else {}
