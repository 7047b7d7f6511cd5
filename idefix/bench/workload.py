"""The inputs every engine is measured on: distinct text prompts of exact lengths, distinct images.

Every request of a run gets content no earlier request had (a number in the text, a seed in the pixels),
so no engine's prefix cache or image-feature cache can answer from an earlier request.
"""

from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
from PIL import Image

WORDS = (
    "the",
    "a",
    "picture",
    "shows",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "star",
    "line",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "near",
    "far",
    "under",
    "over",
    "next",
    "to",
    "between",
    "two",
    "three",
    "four",
    "many",
    "few",
    "bright",
    "dark",
    "shadow",
    "light",
    "colour",
    "shape",
    "object",
    "scene",
    "background",
    "foreground",
    "describe",
    "what",
    "where",
    "how",
    "why",
    "image",
    "photo",
    "drawing",
)


class Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


def text_ids(tokenizer: Encoder, length: int, seed: int) -> list[int]:
    """`length` token ids of plain text (no special tokens) that no other seed produces."""
    rng = random.Random(seed)
    ids: list[int] = tokenizer.encode(f"{seed}: ", add_special_tokens=False)
    while len(ids) < length:
        words = " " + " ".join(rng.choice(WORDS) for _ in range(64))
        ids += tokenizer.encode(words, add_special_tokens=False)
    return ids[:length]


def prompt_text(length_words: int, seed: int) -> str:
    """Plain text of about `length_words` words that no other seed produces (for engines that take text)."""
    rng = random.Random(seed)
    return f"{seed}: " + " ".join(rng.choice(WORDS) for _ in range(length_words))


def random_image(size: int, seed: int) -> Image.Image:
    """A size x size RGB image of smooth random colours (compresses like a photo, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
    noise = rng.integers(-8, 9, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def image_messages(image: Any, question: str = "Describe the image.") -> list[dict[str, Any]]:
    """A one-image user turn, OpenAI style (`image` may be a PIL image or a URL / data URI)."""
    part = (
        {"type": "image", "image": image}
        if isinstance(image, Image.Image)
        else {"type": "image_url", "image_url": {"url": image}}
    )
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
