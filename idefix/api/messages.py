"""`VisionMessages`: a conversation built step by step, as mistralrs's Rust builder API builds it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from idefix.api.options import TextMessageRole
from idefix.errors import InvalidRequestError

if TYPE_CHECKING:
    from PIL import Image

    # An image: a URL, local path, data URI or base64 string, a path object, raw file bytes, or a PIL image.
    ImageInput = str | os.PathLike[str] | bytes | Image.Image


class VisionMessages:
    """A list of chat messages with images, usable wherever idefix takes messages.

        messages = VisionMessages().add_image_message(TextMessageRole.User, "What is this?", image)
        messages.add_message(TextMessageRole.Assistant, "A star.").add_message(TextMessageRole.User, "Colour?")

    Each `add_*` appends and returns the same object, so calls chain.
    """

    def __init__(self) -> None:
        self._messages: list[dict[str, Any]] = []

    def add_message(self, role: TextMessageRole | str, text: str) -> VisionMessages:
        """Append a text-only message."""
        return self.add_image_message(role, text, [])

    def add_image_message(
        self, role: TextMessageRole | str, text: str, image: ImageInput | Sequence[ImageInput], model: object = None
    ) -> VisionMessages:
        """Append a message showing `image` (one image or a list of them) followed by `text`.

        `model` is accepted for parity with mistralrs (whose Rust signature needs it) and not used.
        """
        if not isinstance(text, str):
            raise InvalidRequestError(f"message text must be a string, got {type(text).__name__}")
        images: list[Any] = list(image) if isinstance(image, list | tuple) else [image]
        parts = [_image_part(one) for one in images]
        parts.append({"type": "text", "text": text})
        self._messages.append({"role": _role(role), "content": parts})
        return self

    def clear(self) -> VisionMessages:
        """Remove every message."""
        self._messages.clear()
        return self

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The OpenAI-style message list (a copy)."""
        return [dict(message) for message in self._messages]

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.messages)

    def __repr__(self) -> str:
        return f"VisionMessages({len(self)} messages)"


def _role(role: TextMessageRole | str) -> str:
    if isinstance(role, TextMessageRole):
        return role.value
    try:
        return TextMessageRole(str(role).lower()).value
    except ValueError:
        choices = ", ".join(member.name for member in TextMessageRole)
        raise InvalidRequestError(f"role {role!r} is not known; choose one of {choices}") from None


def _image_part(image: ImageInput) -> dict[str, Any]:
    if isinstance(image, str | os.PathLike):
        return {"type": "image_url", "image_url": {"url": os.fspath(image)}}
    return {"type": "image", "image": image}  # PIL image or bytes, checked when the request is prepared
