"""Message normalisation for the chat template, and one clear error per malformed message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from idefix.demo.vocab import SMOLVLM_CHAT_TEMPLATE
from idefix.errors import InvalidRequestError, ModelLoadError
from idefix.processing.prompt import ChatTemplate, normalize_messages


def test_normalisation() -> None:
    messages = [
        {"role": "system", "content": "Be brief.", "name": "ignored"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                {"type": "image", "image": object()},
                {"type": "text", "text": "Hi"},
            ],
        },
    ]
    assert normalize_messages(messages) == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Hi"}]},
    ]


def test_smolvlm_text_only_turn_keeps_its_text() -> None:
    rendered = ChatTemplate(SMOLVLM_CHAT_TEMPLATE).render(
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
        ]
    )
    assert rendered == (
        "<|im_start|>User:<image>Describe the image.<end_of_utterance>\n"
        "Assistant: A cat.<end_of_utterance>\nUser: Why?<end_of_utterance>\nAssistant:"
    )


BAD: dict[str, tuple[Any, str]] = {
    "not_a_list": ({"role": "user", "content": "hi"}, "messages must be a list"),
    "a_string": ("hello", "messages must be a list"),
    "empty": ([], "at least one message"),
    "message_not_object": (["hi"], r"messages\[0\] must be an object"),
    "unknown_role": ([{"role": "tool", "content": "x"}], r"messages\[0\] has role 'tool'"),
    "missing_role": ([{"content": "x"}], "has role None"),
    "missing_content": ([{"role": "user"}], r"messages\[0\]\.content must be a string or a list"),
    "null_content": ([{"role": "assistant", "content": None}], "content must be a string or a list"),
    "number_content": ([{"role": "user", "content": 3}], "content must be a string or a list"),
    "empty_parts": ([{"role": "user", "content": []}], "must not be an empty list"),
    "part_not_object": ([{"role": "user", "content": ["hi"]}], r"content\[0\] must be an object"),
    "unknown_part": ([{"role": "user", "content": [{"type": "audio"}]}], "unknown type 'audio'"),
    "missing_type": ([{"role": "user", "content": [{"text": "x"}]}], "unknown type None"),
    "text_not_string": ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "needs a string 'text'"),
    "image_url_string": (
        [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}],
        "needs 'image_url': {'url'",
    ),
    "image_url_no_url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_messages(name: str) -> None:
    messages, message = BAD[name]
    with pytest.raises(InvalidRequestError, match=message):
        ChatTemplate(SMOLVLM_CHAT_TEMPLATE).render(messages)


def test_second_message_is_named() -> None:
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.content\[1\]"):
        normalize_messages(
            [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}, {}]}]
        )


def test_template_syntax_error_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m }")
    with pytest.raises(ModelLoadError, match="chat_template.jinja"):
        ChatTemplate.from_dir(tmp_path)


def test_corrupt_chat_template_json(tmp_path: Path) -> None:
    (tmp_path / "chat_template.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="chat_template.json is not valid JSON"):
        ChatTemplate.from_dir(tmp_path)


def test_named_templates_without_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": [{"name": "tool_use", "template": "x"}]}')
    with pytest.raises(ModelLoadError, match="none is 'default'"):
        ChatTemplate.from_dir(tmp_path)


@pytest.mark.parametrize(
    "source", ["{{ messages.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}", "{{ messages.append(1) }}"]
)
def test_sandbox_blocks_unsafe_operations(source: str) -> None:
    with pytest.raises(InvalidRequestError, match="chat template rejected"):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
