"""The state of one terminal chat: the conversation, its images, the sampling settings, the last usage.

Turns are kept in OpenAI format (image parts carry the source as the user typed it, local paths made
absolute) so `\\save` writes a request body the server accepts. Each image is loaded once, when its turn is
sent; later turns hand the engine the loaded picture, so a URL is never fetched twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from idefix.errors import InvalidRequestError
from idefix.media import MediaPolicy, load_image
from idefix.request import Usage
from idefix.sampling import SamplingParams


@dataclass
class Settings:
    """Sampling settings the chat commands change; greedy until `\\temperature` is set."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed,
        )

    def describe(self) -> str:
        if self.temperature == 0 or self.top_k == 1:
            return "greedy"
        return f"temperature {self.temperature}, top-k {self.top_k or 'off'}, top-p {self.top_p}"


@dataclass
class Conversation:
    model_id: str
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)
    images: dict[str, Image.Image] = field(default_factory=dict)  # source as stored in turns -> picture
    last_usage: Usage | None = None

    def user_turn(self, sources: tuple[str, ...], text: str, policy: MediaPolicy) -> dict[str, Any]:
        """Load the images (ImageError on the first bad one) and build the user message; not yet added."""
        parts: list[dict[str, Any]] = []
        for source in sources:
            stored = _stored_source(source)
            if stored not in self.images:
                self.images[stored] = load_image(stored, policy)
            parts.append({"type": "image_url", "image_url": {"url": stored}})
        if not text and not parts:
            raise InvalidRequestError("the message is empty")
        parts.append({"type": "text", "text": text})
        return {"role": "user", "content": parts}

    def messages(self, extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The OpenAI-format conversation (system prompt first), plus `extra` when given."""
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return [*system, *self.turns, *([extra] if extra else [])]

    def engine_messages(self, extra: dict[str, Any]) -> list[dict[str, Any]]:
        """`messages(extra)` with each image part replaced by its already loaded picture."""
        return [{**m, "content": [self._loaded(part) for part in m["content"]]} for m in self.messages(extra)]

    def _loaded(self, part: dict[str, Any]) -> dict[str, Any]:
        if part["type"] != "image_url":
            return part
        return {"type": "image", "image": self.images[part["image_url"]["url"]]}

    def add_exchange(self, user: dict[str, Any], answer: str, usage: Usage | None) -> None:
        self.turns.append(user)
        self.turns.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
        self.last_usage = usage

    def clear(self) -> None:
        self.turns.clear()
        self.images.clear()

    def save(self, file: str) -> Path:
        """Write {"model", "messages"} as JSON (a chat-completions request body); OSError if it cannot."""
        path = Path(file).expanduser()
        body = {"model": self.model_id, "messages": self.messages()}
        path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
        return path

    def stats(self) -> str:
        u = self.last_usage
        if u is None:
            return "no answer yet"
        cached = f", {u.cached_prompt_tokens} cached" if u.cached_prompt_tokens else ""
        return (
            f"time to first token {u.time_to_first_token:.3f} s · "
            f"prompt {u.prompt_tokens} tokens{cached}, {u.avg_prompt_tok_per_sec:.1f} tok/s · "
            f"answer {u.completion_tokens} tokens, {u.avg_compl_tok_per_sec:.1f} tok/s"
        )


def _stored_source(source: str) -> str:
    """URLs and data URIs as typed; a local path made absolute so a saved conversation works from anywhere."""
    if source.lower().startswith(("http://", "https://", "file://", "data:")):
        return source
    return os.path.abspath(os.path.expanduser(source))
