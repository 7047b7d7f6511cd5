"""Turn a model id (local folder, `demo`, or Hugging Face repo id) into a local folder of checkpoint files.

Downloads go through `huggingface_hub.snapshot_download` with no cache or offline override, so
HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT and the token (HF_TOKEN or `hf auth login`) are
honoured exactly as the hub library reads them. Every failure becomes one `ModelLoadError` line.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from idefix.errors import ModelLoadError

DEMO_NAME = "demo"

# What a checkpoint needs, read exactly as the hub ships it; top-level files only (see IGNORE_PATTERNS).
ALLOW_PATTERNS = [
    *("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json"),
    *("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"),
    *("chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json"),
]
# Sub-folders (onnx/, original/, ...) hold other formats or duplicate weights we never read.
IGNORE_PATTERNS = ["*/*"]


def demo_model_dir() -> Path:
    """The demo checkpoint folder shipped inside the package (it may not exist in a source checkout)."""
    import idefix.demo

    return Path(idefix.demo.__file__).parent / "model"


def resolve_model(model_id: str | None, revision: str | None = None, token: str | None = None) -> Path:
    """Return the local folder holding the checkpoint for `model_id`, downloading it if needed.

    `model_id` is `demo` (or None) for the shipped demo model, an existing folder (absolute, relative
    or `~`), or a Hugging Face repo id `org/name`. `revision` (branch, tag or commit) and `token` only
    apply to repo ids; a None token lets huggingface_hub use HF_TOKEN or the cached login.
    Raises `ModelLoadError` with one line naming the model id and the fix.
    """
    if model_id is None or model_id == DEMO_NAME:
        folder = demo_model_dir()
        if not folder.is_dir():
            raise ModelLoadError(f"the demo model is missing at {folder}; build it (idefix.demo) or reinstall idefix")
        return _checked(folder, DEMO_NAME, need_weights=False)
    local = Path(model_id).expanduser()
    if model_id.strip() and local.exists():  # Path("") is "." and would be the current folder
        if not local.is_dir():
            raise ModelLoadError(f"model {model_id!r} is a file; pass the folder that holds config.json")
        return _checked(local.resolve(), model_id, need_weights=False)
    if model_id.count("/") != 1 or not _is_repo_id(model_id):
        raise ModelLoadError(
            f"model {model_id!r} is neither an existing folder nor a Hugging Face repo id (org/name); "
            "check the path or the spelling"
        )
    return _checked(_download(model_id, revision, token), model_id, need_weights=True)


def _is_repo_id(model_id: str) -> bool:
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, revision: str | None, token: str | None) -> Path:
    at = f"{repo_id}@{revision}" if revision else repo_id
    page = f"{constants.ENDPOINT}/{repo_id}"
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    except GatedRepoError as err:
        raise ModelLoadError(f"model {at} is gated: accept its licence at {page}, then {login}") from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(
            f"model {at} was not found on the Hugging Face hub (or is private): check the id, or {login}"
        ) from err
    except RevisionNotFoundError as err:
        raise ModelLoadError(
            f"model {at}: revision {revision!r} does not exist; pick a branch, tag or commit from {page}"
        ) from err
    except LocalEntryNotFoundError as err:
        cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached"
        raise ModelLoadError(
            f"model {at} is not in the local cache at {cache} (or is incomplete there) and {why}; "
            f"download it with network access (`hf download {repo_id}`, HF_HUB_OFFLINE unset) and retry"
        ) from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = login if status in (401, 403) else "check your network and retry"
        raise ModelLoadError(f"model {at}: the hub answered HTTP {status}; {hint}") from err
    except Exception as err:  # network, proxy or disk errors from any HTTP backend huggingface_hub uses
        raise ModelLoadError(f"model {at} could not be downloaded ({type(err).__name__}: {err})") from err
    return Path(folder)


def _checked(folder: Path, model_id: str, *, need_weights: bool) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model {model_id!r}: no config.json in {folder}; point at a checkpoint folder")
    if need_weights and not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"model {model_id!r}: no *.safetensors weights in {folder} (idefix reads safetensors only; "
            "a partial offline cache looks like this too: download it again with network access)"
        )
    return folder
