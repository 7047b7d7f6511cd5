"""Broken checkpoints give one clear ModelLoadError (Python) / one line and exit 1 (CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idefix.errors import ModelLoadError
from idefix.loading import load
from tests.checkpoints import SPECS, build_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(SPECS[0], tmp_path_factory.mktemp("good") / "model")


def _copy(good: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def test_good_checkpoint_loads(good: Path) -> None:
    loaded = load(str(good), progress=False)
    assert loaded.eos_token_ids == {loaded.processor.tokenizer.token_to_id("<end_of_utterance>")}


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no-config", "no config.json in"),
        ("bad-json", "not valid JSON"),
        ("wrong-model-type", "model_type 'bert'"),
        ("no-weights", "no *.safetensors"),
        ("truncated", "not a readable safetensors file"),
        ("wrong-shape", "has shape"),
        ("no-tokenizer", "tokenizer.json not found"),
        ("no-preprocessor", "preprocessor_config.json"),
    ],
)
def test_broken_checkpoint_is_one_clear_error(good: Path, tmp_path: Path, breakage: str, message: str) -> None:
    path = _copy(good, tmp_path)
    config = json.loads((path / "config.json").read_text())
    weights = path / "model.safetensors"
    if breakage == "no-config":
        (path / "config.json").unlink()
    elif breakage == "bad-json":
        (path / "config.json").write_text("{not json")
    elif breakage == "wrong-model-type":
        (path / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif breakage == "no-weights":
        weights.unlink()
    elif breakage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breakage == "wrong-shape":
        config["text_config"]["intermediate_size"] += 1
        (path / "config.json").write_text(json.dumps(config))
    elif breakage == "no-tokenizer":
        (path / "tokenizer.json").unlink()
    elif breakage == "no-preprocessor":
        (path / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=message.replace("*", r"\*").replace("(", r"\(")):
        load(str(path), progress=False)


def test_missing_tensor_is_named(good: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = _copy(good, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.text_model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.text_model\.norm\.weight \(64,\)"):
        load(str(path), progress=False)


@pytest.mark.parametrize("model_id", ["./does-not-exist", "a/b/c"])
def test_cli_bad_model_id_is_one_line(model_id: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "idefix", "run", "-m", model_id, "hello"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idefix: error:"), out.stderr
    assert "Traceback" not in out.stderr


def test_cli_wrong_flag_exits_2() -> None:
    out = subprocess.run([sys.executable, "-m", "idefix", "run", "--nope", "x"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--nope" in out.stderr
