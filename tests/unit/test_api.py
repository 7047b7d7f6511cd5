"""The Python API's pure parts: lazy exports, mistralrs names and aliases, request translation, messages,
and the arguments whose features are not available yet (refused before anything is loaded)."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import idefix
from idefix import (
    ChatCompletionRequest,
    InvalidRequestError,
    IsqType,
    ModelDType,
    MultimodalArchitecture,
    Runner,
    TextMessageRole,
    VisionArchitecture,
    VisionMessages,
    VisionModelBuilder,
    Which,
)
from idefix.api.load_options import NOT_YET, hub_token
from idefix.sampling import SamplingParams, from_openai


def test_import_idefix_loads_no_torch() -> None:
    code = (
        "import sys, idefix\n"
        "from idefix import Which, ChatCompletionRequest, VisionArchitecture, IsqType, VisionMessages, IdefixError\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_export_resolves_and_is_documented() -> None:
    assert set(idefix.__all__) == {"__version__", *idefix._MODULE_OF}
    for name in idefix._MODULE_OF:
        value = getattr(idefix, name)
        assert inspect.getdoc(value), f"idefix.{name} has no docstring"
    with pytest.raises(AttributeError):
        idefix.NoSuchThing  # noqa: B018


def test_public_methods_are_documented() -> None:
    for cls in (Runner, VisionModelBuilder, idefix.VisionModel, VisionMessages, ChatCompletionRequest):
        for name, member in vars(cls).items():
            if callable(member) and not name.startswith("_"):
                assert inspect.getdoc(member), f"{cls.__name__}.{name} has no docstring"


def test_mistralrs_names_and_newer_aliases() -> None:
    assert Which.MultimodalPlain is Which.VisionPlain
    assert MultimodalArchitecture is VisionArchitecture
    which = Which.VisionPlain(model_id="m", arch=VisionArchitecture.Idefics3)
    assert which.arch is VisionArchitecture.Idefics3 and which.dtype is ModelDType.Auto
    assert Which.VisionPlain("m", arch="idefics3", dtype="bf16").dtype is ModelDType.BF16
    assert Which.VisionPlain("m", dtype="F16").dtype is ModelDType.F16
    with pytest.raises(InvalidRequestError, match="arch"):
        Which.VisionPlain("m", arch="llava")
    with pytest.raises(InvalidRequestError, match="dtype"):
        Which.VisionPlain("m", dtype="int3")
    with pytest.raises(InvalidRequestError, match="model_id"):
        Which.VisionPlain("  ")


def test_isq_types_are_the_ggml_names() -> None:
    names = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2K", "Q3K", "Q4K", "Q5K", "Q6K", "Q8K"]
    assert [member.name for member in IsqType] == names == [member.value for member in IsqType]
    assert IsqType.parse("q4k") is IsqType.Q4K and IsqType.parse(IsqType.Q8_0) is IsqType.Q8_0
    with pytest.raises(InvalidRequestError, match="Q4K"):
        IsqType.parse("Q7")


def test_request_fields_translate_to_sampling_params() -> None:
    request = ChatCompletionRequest(
        [{"role": "user", "content": "hi"}],
        max_tokens=256,
        presence_penalty=1.0,
        top_p=0.1,
        temperature=0.1,
        n_choices=2,
        stop_seqs=["END"],
        logit_bias={"5": 2.0},  # type: ignore[dict-item]  # JSON-style keys are accepted
        seed=3,
    )
    params = from_openai(**request.sampling_fields())
    expected = SamplingParams(max_tokens=256, presence_penalty=1.0, top_p=0.1, temperature=0.1, n=2, seed=3)
    assert params == dataclasses.replace(expected, stop=("END",), logit_bias={5: 2.0})
    openai_names = ChatCompletionRequest([], n=2, stop="x", max_completion_tokens=9, min_p=0.1, top_k=5)
    params = from_openai(**openai_names.sampling_fields())
    assert (params.n, params.stop, params.max_tokens, params.min_p, params.top_k) == (2, ("x",), 9, 0.1, 5)
    assert from_openai(**ChatCompletionRequest([]).sampling_fields()) == SamplingParams()


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"n": 2, "n_choices": 3}, "n_choices"),
        ({"stop": "a", "stop_seqs": ["b"]}, "stop_seqs"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_conflicting_request_fields_are_refused(fields: dict, named: str) -> None:
    with pytest.raises(InvalidRequestError, match=named):
        ChatCompletionRequest([], **fields).sampling_fields()


def test_bad_sampling_values_name_the_field() -> None:
    for fields, name in (({"temperature": 3.0}, "temperature"), ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(InvalidRequestError, match=name):
            from_openai(**ChatCompletionRequest([], **fields).sampling_fields())


def test_vision_messages_build_openai_messages(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8))
    messages = (
        VisionMessages()
        .add_message(TextMessageRole.System, "Be brief.")
        .add_image_message(TextMessageRole.User, "Which is bigger?", [image, tmp_path / "b.png"], model=None)
        .add_message("assistant", "The first.")
        .add_image_message("User", "And this?", "https://example.com/c.png")
    )
    assert len(messages) == 4
    assert messages.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}},
                {"type": "text", "text": "Which is bigger?"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/c.png"}},
                {"type": "text", "text": "And this?"},
            ],
        },
    ]
    with pytest.raises(InvalidRequestError, match="role"):
        VisionMessages().add_message("tool", "x")
    with pytest.raises(InvalidRequestError, match="text"):
        VisionMessages().add_message(TextMessageRole.User, 5)  # type: ignore[arg-type]
    assert len(messages.clear()) == 0


@pytest.mark.parametrize("argument", sorted(NOT_YET))
def test_features_not_available_yet_are_refused_before_loading(argument: str) -> None:
    which_fields = {f.name for f in dataclasses.fields(Which.VisionPlain)}
    values: dict[str, Any] = {"in_situ_quant": "Q8_0", "num_device_layers": ["0:4"]}
    value = values.get(argument, "some/file")
    missing = "/nonexistent/idefix-model"  # loading it would raise ModelLoadError, so nothing is loaded first
    if argument in which_fields:
        call = lambda: Runner(Which.VisionPlain(missing, **{argument: value}))  # noqa: E731
    else:
        call = lambda: Runner(Which.VisionPlain(missing), **{argument: value})  # noqa: E731
    with pytest.raises(InvalidRequestError, match=f"{argument}.*not available"):
        call()


def test_builder_refuses_what_is_not_available_yet_and_bad_settings() -> None:
    builder = VisionModelBuilder("/nonexistent/idefix-model")
    if "in_situ_quant" in NOT_YET:
        with pytest.raises(InvalidRequestError, match="in_situ_quant"):
            builder.with_isq(IsqType.Q8_0).build()
    with pytest.raises(InvalidRequestError, match="in_situ_quant"):
        builder.with_isq("Q9")
    with pytest.raises(InvalidRequestError, match="max_num_seqs"):
        builder.with_max_num_seqs(0).build()
    assert builder.with_dtype("bf16").with_force_cpu().dtype is ModelDType.BF16
    assert builder.model_id == "/nonexistent/idefix-model" and builder.device is None  # builders are immutable


def test_runner_refuses_bad_arguments_before_loading() -> None:
    with pytest.raises(InvalidRequestError, match="Which.VisionPlain"):
        Runner("HuggingFaceTB/SmolVLM-256M-Instruct")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="seed"):
        Runner(Which.VisionPlain("/nonexistent/idefix-model"), seed=1.5)  # type: ignore[arg-type]


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("hf_file\n")
    monkeypatch.setenv("IDEFIX_TEST_TOKEN", "hf_env")
    assert hub_token("cache") is None and hub_token("none") is None
    assert hub_token("literal:hf_lit") == "hf_lit"
    assert hub_token("env:IDEFIX_TEST_TOKEN") == "hf_env"
    assert hub_token(f"path:{tmp_path / 'token'}") == "hf_file"
    for bad in ("env:IDEFIX_UNSET_VARIABLE", f"path:{tmp_path / 'absent'}", "keyring", "literal:"):
        with pytest.raises(InvalidRequestError, match="token_source"):
            hub_token(bad)
