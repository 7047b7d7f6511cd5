"""resolve_model: local folders, the demo name, bad ids, and a fake on-disk Hugging Face cache (offline)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import idefix.demo
from idefix import hub
from idefix.errors import ModelLoadError
from idefix.hub import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIG = {"model_type": "idefics3"}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[Any]]:
    """HF_HUB_OFFLINE everywhere, a private empty cache, and a record of any socket connection attempt."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads the env into `constants` at import time: patch what snapshot_download reads.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    attempts: list[Any] = []

    def refuse(sock: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"network connection attempted: {attempts}"


def make_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def add_to_cache(hub_cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """The exact layout huggingface_hub writes: blobs by hash, snapshot symlinks, refs/main = commit."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no trailing newline: the hub reads it verbatim
    return snapshot


CHECKPOINT_FILES = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": b"weights"}


# --- local folders ------------------------------------------------------------------------------


def test_absolute_folder(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "ckpt")
    assert resolve_model(str(folder)) == folder.resolve()


def test_relative_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_checkpoint(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("models/tiny") == folder.resolve()  # a folder wins over the repo id `models/tiny`
    assert resolve_model("./models/tiny").is_absolute()


def test_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = make_checkpoint(tmp_path / "ckpt")
    assert resolve_model("~/ckpt") == folder.resolve()


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(path))


@pytest.mark.parametrize("bad", ["./nope", "a/b/c", "", "nope", "org/na me", "~/missing", "/no/such/dir"])
def test_bad_ids(bad: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a Hugging Face repo id") as err:
        resolve_model(bad)
    assert "\n" not in str(err.value)


# --- demo -----------------------------------------------------------------------------------------


def test_demo_folder_location() -> None:
    assert hub.demo_model_dir() == Path(idefix.demo.__file__).parent / "model"


def test_demo_and_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "demo_model_dir", lambda: tmp_path / "model")
    with pytest.raises(ModelLoadError, match="demo model is missing"):
        resolve_model("demo")
    make_checkpoint(tmp_path / "model")
    assert resolve_model("demo") == resolve_model(None) == tmp_path / "model"


# --- fake hub cache, offline ----------------------------------------------------------------------


def test_cached_repo_resolves_to_snapshot(tmp_path: Path) -> None:
    snapshot = add_to_cache(tmp_path / "hf" / "hub", "org/name", CHECKPOINT_FILES)
    folder = resolve_model("org/name")
    assert folder == snapshot
    assert json.loads((folder / "config.json").read_text()) == CONFIG
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert resolve_model("org/name", revision="main") == snapshot


def test_cached_commit_revision(tmp_path: Path) -> None:
    other = "f" * 40
    add_to_cache(tmp_path / "hf" / "hub", "org/name", CHECKPOINT_FILES)
    snapshot = add_to_cache(tmp_path / "hf" / "hub", "org/name", CHECKPOINT_FILES, commit=other)
    assert resolve_model("org/name", revision=other) == snapshot  # refs/main points at COMMIT, not here


def test_repo_not_in_cache(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve_model("org/absent")
    message = str(err.value)
    assert "org/absent" in message and "not in the local cache" in message
    assert str(tmp_path / "hf" / "hub" / "models--org--absent") in message
    assert "HF_HUB_OFFLINE is set" in message and "hf download org/absent" in message
    assert "\n" not in message


def test_revision_not_in_cache(tmp_path: Path) -> None:
    add_to_cache(tmp_path / "hf" / "hub", "org/name", CHECKPOINT_FILES)
    with pytest.raises(ModelLoadError, match=r"org/name@v2 is not in the local cache"):
        resolve_model("org/name", revision="v2")


def test_partial_snapshot_without_weights(tmp_path: Path) -> None:
    add_to_cache(tmp_path / "hf" / "hub", "org/name", {"config.json": b"{}"})
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        resolve_model("org/name")


SCRIPT = """
from idefix.hub import resolve_model
from idefix.errors import ModelLoadError
print(resolve_model("org/name"))
try:
    resolve_model("org/absent")
except ModelLoadError as err:
    print(err)
"""


@pytest.mark.parametrize("env_var", ["HF_HOME", "HF_HUB_CACHE"])
def test_env_vars_read_by_fresh_process(env_var: str, tmp_path: Path) -> None:
    """No constant patching: huggingface_hub itself reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE."""
    root = tmp_path / "elsewhere"
    hub_cache = root / "hub" if env_var == "HF_HOME" else root
    snapshot = add_to_cache(hub_cache, "org/name", CHECKPOINT_FILES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({env_var: str(root), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found, absent = run.stdout.splitlines()
    assert Path(found) == snapshot
    assert "not in the local cache" in absent and str(hub_cache / "models--org--absent") in absent


# --- hub errors (snapshot_download faked: nothing here may go online) -------------------------------


def http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/name")
    return cls(f"{status} Client Error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (http_error(GatedRepoError, 403), "is gated: accept its licence"),
        (http_error(RepositoryNotFoundError, 401), "not found on the Hugging Face hub"),
        (http_error(RevisionNotFoundError, 404), "revision 'v9' does not exist"),
        (http_error(HfHubHTTPError, 401), "HTTP 401; log in"),
        (http_error(HfHubHTTPError, 503), "HTTP 503; check your network"),
        (httpx2.ConnectError("connection refused"), "could not be downloaded \\(ConnectError"),
    ],
)
def test_hub_errors_become_one_line(error: Exception, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(hub, "snapshot_download", fail)
    with pytest.raises(ModelLoadError, match=expected) as err:
        resolve_model("org/name", revision="v9")
    assert "org/name@v9" in str(err.value) and "\n" not in str(err.value)
    assert err.value.__cause__ is error


def test_download_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(repo_id: str, **kwargs: Any) -> str:
        seen.update(kwargs, repo_id=repo_id)
        (make_checkpoint(tmp_path / "snap") / "model.safetensors").touch()
        return str(tmp_path / "snap")

    monkeypatch.setattr(hub, "snapshot_download", fake)
    resolve_model("org/name", revision="abc", token="hf_x")
    assert seen["repo_id"] == "org/name" and seen["revision"] == "abc" and seen["token"] == "hf_x"
    assert {"config.json", "*.safetensors", "tokenizer.json"} <= set(seen["allow_patterns"])
    assert not {"cache_dir", "local_files_only", "local_dir"} & set(seen)  # env vars stay in charge
