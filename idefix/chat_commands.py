"""What one line typed at the chat prompt means: a backslash command or a message (text + image sources).

Pure string work, no model and no terminal, so every rule here has a unit test.

- `\\image SRC [SRC ...] PROMPT`: the leading words that look like images (a URL, a `data:` URI, a word with
  an image extension, an existing file) are the images, the rest is the prompt. Quote a path with spaces.
- A plain message picks up words that name an image as newer mistral.rs does: http(s)/file URLs and paths
  ending in .png .jpg .jpeg .webp .gif .bmp .tif .tiff, and `data:image/...` URIs. They are sent as images and
  removed from the text; sentence punctuation after them is ignored. Escape: write the word in backticks or
  quotes (`photo.png`, "photo.png"), or start the line with `\\\\` to send the rest exactly as typed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from idefix.errors import InvalidRequestError

COMMANDS = {
    "image": "\\image SRC [SRC ...] PROMPT   ask about images: paths, http(s) URLs or data URIs",
    "system": "\\system TEXT                  set the system prompt (\\system alone removes it)",
    "clear": "\\clear                        forget the conversation (the system prompt stays)",
    "temperature": "\\temperature X                sample at temperature X (0 = greedy, the default)",
    "topk": "\\topk N                       keep the N most likely tokens (0 = off)",
    "topp": "\\topp X                       nucleus sampling with mass X (1 = off)",
    "stats": "\\stats                        time to first token and tok/s of the last answer",
    "save": "\\save FILE                    write the conversation as OpenAI-format JSON",
    "help": "\\help                         this list",
    "exit": "\\exit                         leave (so do Ctrl-D and Ctrl-C on an empty line)",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
_IMAGE_WORD = re.compile(r"\S+\.(?:png|jpe?g|webp|gif|bmp|tiff?)", re.IGNORECASE)
_TRAILING = ".,;:!?)]}\"'"
_QUOTES = "`'\""


def help_text() -> str:
    lines = ["Commands:", *(f"  {usage}" for usage in COMMANDS.values())]
    lines += [
        "A message may name images directly (`What is in photo.jpg?`); quote a word (`photo.jpg`) to send",
        "it as text, or start the line with \\\\ to send it exactly as typed. Ctrl-C stops an answer.",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Command:
    """A backslash command: name (a key of COMMANDS) and the rest of the line, stripped."""

    name: str
    arg: str


@dataclass(frozen=True)
class Message:
    """A user turn: image sources in order, then the text."""

    images: tuple[str, ...]
    text: str
    picked_up: bool = False  # the images were found in plain text (not named by \\image)


def parse_line(line: str) -> Command | Message | None:
    """The meaning of one input line; None for a blank line. Raises InvalidRequestError with one line."""
    stripped = line.strip()
    if not stripped:
        return None
    if stripped.startswith("\\\\"):
        return Message((), stripped[2:].strip())
    if not stripped.startswith("\\"):
        images, text = pick_up_images(stripped)
        return Message(images, text, picked_up=bool(images))
    name, _, arg = stripped[1:].partition(" ")
    name = name.lower()
    if name not in COMMANDS:
        raise InvalidRequestError(f"unknown command \\{name}{_did_you_mean(name)}; \\help lists them")
    if name != "image":
        return Command(name, arg.strip())
    images, text = split_image_args(arg)
    return Message(images, text)


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.5)
    return f" (did you mean \\{close[0]}?)" if close else ""


def split_image_args(arg: str) -> tuple[tuple[str, ...], str]:
    """`\\image`'s argument -> (sources, prompt). Each leading word that looks like an image is a source."""
    sources: list[str] = []
    rest = arg.strip()
    while rest:
        word, after = _next_word(rest)
        if not looks_like_image(word):
            break
        sources.append(word)
        rest = after.lstrip()
    if not sources:
        raise InvalidRequestError("\\image needs at least one image: \\image SRC [SRC ...] PROMPT")
    return tuple(sources), rest


def _next_word(text: str) -> tuple[str, str]:
    """The first word of `text` (a quoted word loses its quotes) and what follows it."""
    if text[0] in _QUOTES:
        end = text.find(text[0], 1)
        if end > 0:
            return text[1:end], text[end + 1 :]
    word, _, after = text.partition(" ")
    return word, after


def looks_like_image(word: str) -> bool:
    """A URL, a data URI, a word with an image extension, or an existing file."""
    lowered = word.lower()
    if lowered.startswith(("http://", "https://", "file://", "data:")):
        return True
    if lowered.endswith(IMAGE_SUFFIXES):
        return True
    try:
        return Path(word).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL
        return False


def pick_up_images(text: str) -> tuple[tuple[str, ...], str]:
    """Image URLs, paths and data URIs named in a plain message -> (sources, the text without them)."""
    sources: list[str] = []
    kept: list[str] = []
    for word in text.split():
        source = _image_in_word(word)
        if source is None:
            kept.append(word)
            continue
        sources.append(source)
        tail = word[len(source) :]  # sentence punctuation after the source stays in the text
        if tail.strip(_TRAILING):
            kept.append(tail)
        elif tail and kept:
            kept[-1] += tail
    return tuple(sources), " ".join(kept)


def _image_in_word(word: str) -> str | None:
    if word[0] in _QUOTES:
        return None  # quoted: the user wants it as text
    if word.lower().startswith("data:image/"):
        return word
    candidate = word.rstrip(_TRAILING)
    match = _IMAGE_WORD.fullmatch(candidate)
    return match.group(0) if match else None
