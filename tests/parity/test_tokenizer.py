"""Tokenizer.encode / decode against transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idefix.processing.tokenizer import Tokenizer
from tests.tokenizer_files import build_llama3, build_smolvlm

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:",
    "<fake_token_around_image><row_1_col_2><image><image>\n\n<fake_token_around_image><global-img>",
    "numbers 1234567 and 13 birds",
    "日本語のテキスト 😀🎉 café — 今日は",
    "",
]


def _variants(root: Path) -> dict[str, Path]:
    return {
        "smolvlm": build_smolvlm(root / "smolvlm"),
        "llama3": build_llama3(root / "llama3"),
        # transformers 5 ignores add_bos_token once tokenizer.json exists: the post-processor decides
        "llama3_add_bos_false": build_llama3(root / "llama3_f", add_bos_token=False),
        "smolvlm_add_bos_true": _with_config(build_smolvlm(root / "smol_t"), add_bos_token=True, add_eos_token=True),
        # a special token named only in tokenizer_config.json gets added to the vocabulary
        "extra_special": _with_config(build_smolvlm(root / "extra"), pad_token="<|pad|>"),
    }


def _with_config(path: Path, **entries: object) -> Path:
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(entries)
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _variants(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("name", ["smolvlm", "llama3", "llama3_add_bos_false", "smolvlm_add_bos_true", "extra_special"])
def test_encode_decode_match_auto_tokenizer(variants: dict[str, Path], name: str) -> None:
    ours = Tokenizer.from_dir(variants[name])
    ref = transformers.AutoTokenizer.from_pretrained(variants[name])
    for text in [*TEXTS, "padding <|pad|> here"]:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.vocab_size == len(ref)
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    for token in ["<image>", "<row_6_col_6>", "<|begin_of_text|>", "<|pad|>", "nope!"]:
        expected = ref.convert_tokens_to_ids(token)  # the unk id for an unknown token
        assert ours.token_to_id(token) == (None if expected == ref.unk_token_id else expected), token


def test_llama3_bos_is_added_once(variants: dict[str, Path]) -> None:
    ours = Tokenizer.from_dir(variants["llama3"])
    assert ours.encode("hi")[0] == ours.token_to_id("<|begin_of_text|>")
    assert ours.encode("hi")[1:] == ours.encode("hi", add_special_tokens=False)
    assert Tokenizer.from_dir(variants["smolvlm"]).encode("hi") == Tokenizer.from_dir(variants["smolvlm"]).encode(
        "hi", add_special_tokens=False
    )
