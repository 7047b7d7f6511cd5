"""Text <-> token ids for a hub checkpoint, and the incremental, UTF-8 safe detokenizer.

`Tokenizer` wraps a `tokenizers.Tokenizer` built from the checkpoint's tokenizer.json, plus the named
special tokens of tokenizer_config.json. `encode` gives the ids `transformers` 5 gives for
`AutoTokenizer.from_pretrained(dir)(text)["input_ids"]`: the tokenizer.json post-processor alone decides
which special tokens are added (transformers 5 drops `add_bos_token` / `add_eos_token` from
tokenizer_config.json whenever a tokenizer.json exists, so a Llama-3 style BOS comes from its
TemplateProcessing post-processor and SmolVLM's ByteLevel post-processor adds nothing).

One known divergence: for a checkpoint whose tokenizer_config.json names `GPT2Tokenizer` (SmolVLM),
transformers 5 rebuilds the pre-tokenizer as a plain ByteLevel and ignores the one in tokenizer.json
(e.g. a `Digits` splitter). idefix follows tokenizer.json, the tokenization the model was trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from idefix.errors import ModelLoadError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The named special tokens of tokenizer_config.json, as transformers' SPECIAL_TOKENS_ATTRIBUTES lists them.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REPLACEMENT_CHAR = "\ufffd"


def read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    """Parse a checkpoint JSON file; a missing optional file gives None, anything unusable a ModelLoadError."""
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent}; the checkpoint is incomplete")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_map(config: dict[str, Any]) -> dict[str, str]:
    """{"bos_token": "<s>", ...} for the named special tokens the config sets (what chat templates see)."""
    found = {name: token_content(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
    return {name: content for name, content in found.items() if content is not None}


def _extra_special_tokens(config: dict[str, Any]) -> list[str]:
    extra: list[str] = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key) or []
        items = value.values() if isinstance(value, dict) else value
        extra += [c for c in map(token_content, items) if c is not None]
    decoder = config.get("added_tokens_decoder") or {}
    specials = [t for t in decoder.values() if isinstance(t, dict) and t.get("special", False)]
    extra += [c for c in map(token_content, specials) if c is not None]
    return extra


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, token lookups and the ids generation needs."""

    def __init__(self, backend: _Backend, special_tokens: dict[str, str]) -> None:
        self.backend = backend
        self.special_tokens = special_tokens
        # ids that decode(skip_special_tokens=True) drops
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        # Truncation / padding baked into tokenizer.json are off for a plain `tokenizer(text)` call.
        backend.no_truncation()
        backend.no_padding()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load tokenizer.json and, when present, the special tokens of tokenizer_config.json."""
        model_dir = Path(model_dir)
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ModelLoadError(f"{TOKENIZER_FILE} not found in {model_dir}; the checkpoint is incomplete")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as exc:  # the Rust parser raises bare Exceptions
            raise ModelLoadError(f"{path} is not a valid tokenizers file: {exc}") from exc
        config = read_json(model_dir / TOKENIZER_CONFIG_FILE, required=False) or {}
        special = special_tokens_map(config)
        # Like transformers, a special token the config names but tokenizer.json lacks is added as one.
        known = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys([*special.values(), *_extra_special_tokens(config)]) if t not in known]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        return cls(backend, special)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the post-processor's special tokens (BOS for Llama 3) when asked."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_to_id(self, token: str) -> int | None:
        result = self.backend.token_to_id(token)
        return None if result is None else int(result)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))


class Detokenizer:
    """Turns a stream of generated ids into text deltas, never splitting a UTF-8 character.

    The concatenation of every `add` result and the final `flush` equals `tokenizer.decode(all_ids)`.
    Only a small window is decoded per call (the prefix/read-offset scheme of vLLM and TGI): `_ids`
    holds the last completed chunk (`_prefix_len` ids, decoding to `_prefix_text`, there only as
    context so that decoders that treat the first token specially, such as Metaspace, see the same
    left context as a full decode) followed by the ids not yet settled. Text is settled when the window
    no longer ends in U+FFFD, the mark of a character still waiting for its remaining bytes.
    `tokenizers.decoders.DecodeStream` does the same but cannot flush a trailing partial character.

    Exact on any ids for byte-level BPE (SmolVLM, Llama 3). With a byte-fallback decoder (Llama 2
    style) it is exact while byte tokens form valid UTF-8: there an invalid byte turns its whole run of
    byte tokens into U+FFFD after the fact, which no streaming decoder can take back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_len = 0
        self._prefix_text = ""
        self._emitted = 0  # chars of the window text past `_prefix_text` already returned

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append ids; return the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self._ids.extend(token_ids)
        text = self._decode(self._ids)
        start = len(self._prefix_text) + self._emitted
        end = len(text)
        while end > start and text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        delta = text[start:end]
        if end < len(text):  # a character is still incomplete: hold it, keep the window
            self._emitted += len(delta)
            return delta
        chunk = self._ids[self._prefix_len :]
        chunk_text = self._decode(chunk)
        if chunk_text:  # the settled chunk becomes the new left context
            self._ids, self._prefix_len, self._prefix_text = chunk, len(chunk), chunk_text
        elif self._skip and self._tokenizer.special_ids.issuperset(chunk):  # skipped: no trace in the text
            del self._ids[self._prefix_len :]
        else:  # decodes to nothing on its own: keep the old context so it still starts with real text
            self._prefix_len, self._prefix_text = len(self._ids), text
        self._emitted = 0
        return delta

    def flush(self) -> str:
        """Return whatever is held back (a trailing incomplete character decodes to U+FFFD) and reset."""
        text = self._decode(self._ids)
        delta = text[len(self._prefix_text) + self._emitted :]
        self._ids, self._prefix_len, self._prefix_text, self._emitted = [], 0, "", 0
        return delta
