"""Loading a checkpoint's tokenizer: properties, and one clear error per unusable file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idefix.errors import ModelLoadError
from idefix.processing.tokenizer import Tokenizer
from tests.tokenizer_files import build_llama3, build_smolvlm


def test_smolvlm_style_properties(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(build_smolvlm(tmp_path))
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<end_of_utterance>") is not None
    assert tokenizer.bos_token_id == tokenizer.token_to_id("<|im_start|>") is not None
    assert tokenizer.token_to_id("<no such token>") is None
    assert tokenizer.vocab_size == tokenizer.eos_token_id + 1  # <end_of_utterance> is the last added token
    ids = tokenizer.encode("User:<image>hi<end_of_utterance>")
    assert tokenizer.token_to_id("<image>") in ids  # special tokens are split out of the text
    assert tokenizer.decode(ids) == "User:hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "User:<image>hi<end_of_utterance>"


def test_llama3_style_adds_bos_from_post_processor(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(build_llama3(tmp_path))
    ids = tokenizer.encode("hello")
    assert ids[0] == tokenizer.bos_token_id == tokenizer.token_to_id("<|begin_of_text|>")
    assert tokenizer.encode("hello", add_special_tokens=False) == ids[1:]


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    build_smolvlm(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", b"\xff\xfe"])
def test_corrupt_tokenizer_config(tmp_path: Path, content: str | bytes) -> None:
    build_smolvlm(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer_config_is_tolerated(tmp_path: Path) -> None:
    build_smolvlm(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_id is None and tokenizer.bos_token_id is None
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def test_config_tokens_as_added_token_dicts(tmp_path: Path) -> None:
    build_smolvlm(tmp_path)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<end_of_utterance>", "special": True}
    path.write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<end_of_utterance>") is not None
