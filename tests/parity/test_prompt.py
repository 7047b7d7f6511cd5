"""Chat template rendering, <image> expansion and prompt ids against transformers' Idefics3Processor."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from idefix.errors import InvalidRequestError, ModelLoadError
from idefix.processing.prompt import ChatTemplate, encode_prompt, expand_image_tokens
from idefix.processing.tokenizer import Tokenizer
from tests.tokenizer_files import build_llama3, build_smolvlm

transformers = pytest.importorskip("transformers")
pil_module = pytest.importorskip("transformers.models.idefics3.image_processing_pil_idefics3")

IMAGE_SEQ_LEN = 4
IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

# A template exercising what transformers' sandbox offers: trim/lstrip blocks, bos_token, namespace,
# loop controls, tojson, raise_exception and the {% generation %} tag.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(images=0) %}
{% for message in messages %}
    {% if loop.first and message['role'] == 'assistant' %}
        {{ raise_exception('Conversation cannot start with an assistant turn') }}
    {% endif %}
{{ message['role'] | capitalize }}:
    {% for part in message['content'] %}
        {% if part['type'] == 'image' %}
            {% set ns.images = ns.images + 1 %}
<image>
            {% continue %}
        {% endif %}
 {{ part['text'] | tojson }}
    {% endfor %}
    {% if message['role'] == 'assistant' %}{% generation %}<end_of_utterance>{% endgeneration %}{% endif %}

{% endfor %}
{{ ns.images }} images{% if add_generation_prompt %}
Assistant:{% endif %}"""


def text(s: str) -> dict[str, str]:
    return {"type": "text", "text": s}


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "text_only": [{"role": "user", "content": [text("What is 2+2?")]}],
    "image_first": [{"role": "user", "content": [IMAGE_URL, text("Describe the image.")]}],
    "text_first": [{"role": "user", "content": [text("Look: "), {"type": "image"}, text(" and say.")]}],
    "multi_turn": [
        {"role": "system", "content": [text("You are a careful assistant.")]},
        {"role": "user", "content": [IMAGE_URL, text("What is this?")]},
        {"role": "assistant", "content": [text("A cat on a sofa.")]},
        {"role": "user", "content": [text("And this one?\n"), IMAGE_URL, IMAGE_URL, text("Compare.")]},
        {"role": "assistant", "content": [text("Both are cats — 日本 😀.")]},
        {"role": "user", "content": [text("Thanks! A text-only turn.")]},
    ],
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prompt")
    return {"smolvlm": build_smolvlm(root / "smolvlm"), "llama3": build_llama3(root / "llama3")}


def make_processor(model_dir: Path, template: str | None = None, splitting: bool = True) -> Any:
    image_processor = pil_module.Idefics3ImageProcessorPil(
        size={"longest_edge": 192}, max_image_size={"longest_edge": 64}, do_image_splitting=splitting
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    chat_template = template or ChatTemplate.from_dir(model_dir).source
    return transformers.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=chat_template
    )


def reference_render(processor: Any, messages: list[dict[str, Any]]) -> str:
    # deep copy: transformers rewrites image_url parts in place
    return str(processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, tokenize=False))


@pytest.mark.parametrize("model", ["smolvlm", "llama3"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_matches_processor(dirs: dict[str, Path], model: str, name: str) -> None:
    processor = make_processor(dirs[model])
    ours = ChatTemplate.from_dir(dirs[model])
    messages = CONVERSATIONS[name]
    rendered = ours.render(messages)
    assert rendered == reference_render(processor, messages)
    assert rendered.endswith("Assistant:")
    assert ours.render(messages, add_generation_prompt=False) == str(
        processor.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=False, tokenize=False)
    )
    # the text of every turn survives, including text-only turns
    for message in messages:
        for part in message["content"]:
            assert part["type"] != "text" or part["text"] in rendered


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_feature_template_matches_processor(dirs: dict[str, Path], name: str) -> None:
    processor = make_processor(dirs["llama3"], FEATURE_TEMPLATE)
    ours = ChatTemplate(FEATURE_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>"})
    assert ours.render(CONVERSATIONS[name]) == reference_render(processor, CONVERSATIONS[name])


def test_template_raise_exception_is_invalid_request() -> None:
    ours = ChatTemplate(FEATURE_TEMPLATE)
    with pytest.raises(InvalidRequestError, match="cannot start with an assistant"):
        ours.render([{"role": "assistant", "content": "hi"}])


def test_string_content_renders_like_a_text_part(dirs: dict[str, Path]) -> None:
    processor = make_processor(dirs["smolvlm"])
    as_strings = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": [IMAGE_URL, text("What now?")]},
    ]
    as_parts = [{**m, "content": [text(m["content"])]} if isinstance(m["content"], str) else m for m in as_strings]
    rendered = ChatTemplate.from_dir(dirs["smolvlm"]).render(as_strings)
    assert rendered == reference_render(processor, as_parts)
    assert "Hello there" in rendered
    # transformers 5 passes string content through, and the SmolVLM template then drops the text
    assert "Hello there" not in reference_render(processor, as_strings)


# ---------------------------------------------------------------------------------------------- ids


def images_for(count: int) -> list[Image.Image]:
    sizes = [(100, 40), (30, 30), (150, 190)]  # -> 2x3, 3x3 and 3x3 tiles with this processor
    return [Image.new("RGB", size, (40 * i, 90, 200 - 50 * i)) for i, size in enumerate(sizes[:count])]


def conversation_with(images: list[Image.Image]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [text("Compare these:")]
    content += [{"type": "image", "image": image} for image in images]
    return [
        {"role": "system", "content": [text("You see images.")]},
        {"role": "user", "content": [*content, text("Which is largest?")]},
    ]


@pytest.mark.parametrize("model", ["smolvlm", "llama3"])
@pytest.mark.parametrize("count", [0, 1, 2, 3])
@pytest.mark.parametrize("splitting", [True, False])
def test_prompt_ids_match_processor(dirs: dict[str, Path], model: str, count: int, splitting: bool) -> None:
    processor = make_processor(dirs[model], splitting=splitting)
    tokenizer = Tokenizer.from_dir(dirs[model])
    images = images_for(count)
    messages = conversation_with(images)
    rows: list[int] = []
    cols: list[int] = []
    if images:
        info = processor.image_processor(images, return_row_col_info=True)
        rows, cols = info["rows"][0], info["cols"][0]
        assert (max(rows) > 0) is splitting
    rendered = ChatTemplate.from_dir(dirs[model]).render(messages)
    expanded = expand_image_tokens(rendered, rows, cols, IMAGE_SEQ_LEN)
    ids = encode_prompt(tokenizer, expanded)
    reference = processor.apply_chat_template(
        copy.deepcopy(messages), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert ids == list(reference["input_ids"][0])
    assert ids.count(tokenizer.token_to_id("<image>")) == IMAGE_SEQ_LEN * sum(
        r * c + 1 for r, c in zip(rows, cols, strict=True)
    )
    if model == "smolvlm":  # no BOS in the template: the plain processor call gives the same ids
        direct = processor(text=rendered, images=images or None)
        assert ids == list(direct["input_ids"][0])
    else:  # the template writes the BOS; it is not added a second time
        assert ids.count(tokenizer.token_to_id("<|begin_of_text|>")) == 1


def test_expansion_layout() -> None:
    expanded = expand_image_tokens("a<image>b<image>c", [1, 0], [2, 0], 2)
    assert expanded == (
        "a<fake_token_around_image><row_1_col_1><image><image>"
        "<fake_token_around_image><row_1_col_2><image><image>\n"
        "\n<fake_token_around_image><global-img><image><image><fake_token_around_image>"
        "b<fake_token_around_image><global-img><image><image><fake_token_around_image>c"
    )


@pytest.mark.parametrize(
    ("prompt", "rows", "cols"), [("<image>", [], []), ("no image", [1], [1]), ("<image>", [1, 2], [1])]
)
def test_expansion_count_mismatch(prompt: str, rows: list[int], cols: list[int]) -> None:
    with pytest.raises(InvalidRequestError, match="placeholders"):
        expand_image_tokens(prompt, rows, cols, 4)


# ---------------------------------------------------------------------------------------------- files


def write_variant(base: Path, out: Path, files: dict[str, object]) -> Path:
    shutil.copytree(base, out)
    for name in ("chat_template.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    for name, value in files.items():
        if name == "tokenizer_config.json":
            config["chat_template"] = value
        elif name.endswith(".jinja"):
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_text(str(value))
        else:
            (out / name).write_text(json.dumps(value))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


LOCATIONS = {
    "json": ({"chat_template.json": {"chat_template": "A{{ messages | length }}"}}, "A{{ messages | length }}"),
    "jinja": ({"chat_template.jinja": "B{{ messages | length }}"}, "B{{ messages | length }}"),
    "tokenizer_config": ({"tokenizer_config.json": "C"}, "C"),
    "tokenizer_config_named": (
        {"tokenizer_config.json": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]},
        "D",
    ),
    "json_beats_jinja_and_config": (
        {"chat_template.json": {"chat_template": "J"}, "chat_template.jinja": "K", "tokenizer_config.json": "L"},
        "J",
    ),
    "jinja_beats_config": ({"chat_template.jinja": "K", "tokenizer_config.json": "L"}, "K"),
    "processor_config_beats_all": (
        {"processor_config.json": {"chat_template": "P"}, "chat_template.json": {"chat_template": "J"}},
        "P",
    ),
    "jinja_with_named_dir": ({"chat_template.jinja": "K", "chat_templates/extra.jinja": "X"}, "K"),
}


@pytest.mark.parametrize("name", list(LOCATIONS))
def test_template_location_precedence(dirs: dict[str, Path], tmp_path: Path, name: str) -> None:
    files, expected = LOCATIONS[name]
    model_dir = write_variant(dirs["smolvlm"], tmp_path / name, files)
    processor_dir = tmp_path / "processor"
    make_processor(model_dir, template="unused").image_processor.save_pretrained(processor_dir)
    for f in processor_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    assert ChatTemplate.from_dir(model_dir).source == expected
    reference = transformers.Idefics3Processor.from_pretrained(model_dir).chat_template
    if "tokenizer_config" in name:  # the processor never falls back to the tokenizer's template
        assert reference is None
        reference = transformers.AutoTokenizer.from_pretrained(model_dir).get_chat_template()
    elif isinstance(reference, dict):
        reference = reference["default"]
    assert reference == expected


def test_no_template_is_a_load_error(dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = write_variant(dirs["smolvlm"], tmp_path / "none", {})
    with pytest.raises(ModelLoadError, match="no chat template"):
        ChatTemplate.from_dir(model_dir)
