"""Chat messages -> prompt text -> prompt token ids, with each `<image>` expanded to its tile tokens.

`ChatTemplate.render` gives the text `Idefics3Processor.apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)` gives for the same messages with list content: the
template runs in jinja2's immutable sandbox set up as transformers sets it up (trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, a safe `dict` and `namespace`).
String content becomes one text part. transformers 5 passes a string through unchanged, and the SmolVLM
template, which iterates over `message['content']` parts, then drops the text; idefix keeps it.

`expand_image_tokens` is `Idefics3Processor.replace_image_token` applied to each `<image>` in turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from idefix.errors import InvalidRequestError, ModelLoadError
from idefix.processing.tokenizer import TOKENIZER_CONFIG_FILE, Tokenizer, read_json, special_tokens_map

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------- messages


def _normalize_part(part: object, where: str) -> dict[str, str]:
    if not isinstance(part, Mapping):
        raise InvalidRequestError(f"{where} must be an object with a 'type', got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where} is a text part and needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        if not (isinstance(url, Mapping) and isinstance(url.get("url"), str)):
            raise InvalidRequestError(f"{where} is an image_url part and needs 'image_url': {{'url': <string>}}")
        return {"type": "image"}
    if kind == "image":
        return {"type": "image"}
    raise InvalidRequestError(f"{where} has unknown type {kind!r}; expected 'text', 'image_url' or 'image'")


def normalize_messages(messages: object) -> list[dict[str, Any]]:
    """OpenAI-style messages -> what the chat template sees: {"role", "content": [parts]} with image parts
    reduced to {"type": "image"}. Anything malformed raises InvalidRequestError naming the message."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise InvalidRequestError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages must contain at least one message")
    normalized = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"{where} must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidRequestError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, Sequence) and not isinstance(content, bytes):
            if not content:
                raise InvalidRequestError(f"{where}.content must not be an empty list")
            parts = [_normalize_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
        else:
            raise InvalidRequestError(f"{where}.content must be a string or a list of parts")
        normalized.append({"role": role, "content": parts})
    return normalized


# ---------------------------------------------------------------------------------------------- template


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag); renders the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _pick_default(templates: object, source: Path) -> str:
    """A template value: a string, or named templates (dict, or [{"name", "template"}]) -> the "default"."""
    if isinstance(templates, list):
        templates = {t.get("name"): t.get("template") for t in templates if isinstance(t, dict)}
    if isinstance(templates, dict):
        if "default" not in templates:
            raise ModelLoadError(f"{source} has chat templates {sorted(map(str, templates))} but none is 'default'")
        templates = templates["default"]
    if not isinstance(templates, str):
        raise ModelLoadError(f"{source} has a chat template that is not a string")
    return templates


def find_chat_template(model_dir: Path) -> tuple[str, Path]:
    """The template and the file it came from, in transformers 5's order of precedence:
    processor_config.json's "chat_template" key, chat_template.json, chat_template.jinja, and (the
    tokenizer's template, which the processor itself never falls back to) tokenizer_config.json."""
    for name in ("processor_config.json", "chat_template.json"):
        data = read_json(model_dir / name, required=False)
        if data is not None and data.get("chat_template") is not None:
            return _pick_default(data["chat_template"], model_dir / name), model_dir / name
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8"), jinja_path
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_path} cannot be read: {exc}") from exc
    config_path = model_dir / TOKENIZER_CONFIG_FILE
    config = read_json(config_path, required=False)
    if config is not None and config.get("chat_template") is not None:
        return _pick_default(config["chat_template"], config_path), config_path
    raise ModelLoadError(
        f"no chat template in {model_dir}: expected chat_template.json, chat_template.jinja or a "
        f"'chat_template' entry in {TOKENIZER_CONFIG_FILE}"
    )


class ChatTemplate:
    """A checkpoint's chat template, compiled once; `render` turns messages into the prompt text."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = compile_template(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        model_dir = Path(model_dir)
        source, path = find_chat_template(model_dir)
        config = read_json(model_dir / TOKENIZER_CONFIG_FILE, required=False) or {}
        try:
            return cls(source, special_tokens_map(config))
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc

    def render(self, messages: object, add_generation_prompt: bool = True) -> str:
        """Prompt text for OpenAI-style `messages` (see `normalize_messages`)."""
        chat = normalize_messages(messages)
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc


# ---------------------------------------------------------------------------------------------- images


def image_placeholder(rows: int, cols: int, image_seq_len: int) -> str:
    """The text one image becomes: rows x cols tiles (each row ending in "\\n"), then the global image."""
    tile = IMAGE_TOKEN * image_seq_len
    global_image = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tile}{FAKE_IMAGE_TOKEN}"
    if rows == 0 and cols == 0:
        return global_image
    grid = "".join(
        "".join(f"{FAKE_IMAGE_TOKEN}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n" for r in range(rows)
    )
    return f"{grid}\n{global_image}"


def expand_image_tokens(text: str, rows: Sequence[int], cols: Sequence[int], image_seq_len: int) -> str:
    """Replace the k-th `<image>` of `text` with `image_placeholder(rows[k], cols[k], image_seq_len)`."""
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(rows) or len(rows) != len(cols):
        raise InvalidRequestError(
            f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} placeholders but {len(rows)} images were given"
        )
    out = [pieces[0]]
    for k, piece in enumerate(pieces[1:]):
        out += [image_placeholder(rows[k], cols[k], image_seq_len), piece]
    return "".join(out)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Prompt ids as `processor.apply_chat_template(..., tokenize=True)` makes them: the tokenizer's own
    special tokens are added unless the rendered text already starts with the BOS token."""
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=not (bos is not None and text.startswith(bos)))
