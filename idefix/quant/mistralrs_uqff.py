"""UQFF files written by mistral.rs (its UQFF 1.x layout), read into the stream of checkpoint tensors idefix loads.

A mistral.rs export is a folder of `<stem>-<K>.uqff` shards and `residual.safetensors` (every tensor it did not
quantize: norms, patch and position embeddings, the connector), all plain safetensors. Each shard holds three U32
scalars `uqff.version.{major,minor,patch}` and, for each quantized layer `<key>` (its checkpoint name less
`.weight`):

| tensor | content |
|---|---|
| `<key>.weight.format` | U8 scalar, the kind: 0 GGML blocks, 1 unquantized, 2 HQQ, 3 FP8, 4 AFQ, 5 F8Q8, 6 MXFP4 |
| `<key>.weight` | GGML: U8 [bytes], the rows' blocks back to back as GGUF stores them; unquantized: the float tensor |
| `<key>.weight.dtype` | GGML: U32 scalar, the ggml type id (0 F32, 1 F16 and 30 BF16 hold a float fallback) |
| `<key>.weight.shape` | GGML: U32 [2], the logical [rows, cols] |
| `<key>.bias` | the layer's bias, when it has one |

Since UQFF 1.2 the token embeddings and the LM head are such layers too. Taken from mistral.rs's
mistralrs-quant (`uqff/`, `gguf/mod.rs`, `unquantized/mod.rs`) and checked on files mistral.rs 0.9.5 wrote.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from idefix.errors import ModelLoadError
from idefix.quant.ggml import GGMLType
from idefix.quant.uqff import StoredTensor

MAJOR, MINOR = 1, 2  # reads UQFF 1.0 to 1.2, as mistral.rs does: same major, no newer minor
VERSION_KEYS = ("uqff.version.major", "uqff.version.minor", "uqff.version.patch")
RESIDUAL = "residual.safetensors"
FORMAT = ".weight.format"
GGML, UNQUANTIZED = 0, 1
KINDS = ("GGML", "unquantized", "HQQ", "FP8", "AFQ", "F8Q8", "MXFP4")  # indexed by the format tag
GGML_FLOATS = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def is_mistralrs_uqff(file: Path) -> bool:
    """Whether `file` is a mistral.rs UQFF shard: it carries UQFF version tensors (idefix's files do not)."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            return VERSION_KEYS[0] in handle.keys()  # noqa: SIM118 - safe_open is not a mapping
    except (SafetensorError, OSError):
        return False


def read_mistralrs_uqff(files: Sequence[Path]) -> Iterator[StoredTensor]:
    """(name, file, tensor, GGML type or None, logical shape) for every tensor of the mistral.rs shards `files`
    and of the `residual.safetensors` next to them (where mistral.rs looks for it too)."""
    shards = [file for file in files if file.name != RESIDUAL]
    residuals = dict.fromkeys(file.parent / RESIDUAL for file in files)
    seen: set[str] = set()
    for entry in chain(*map(_shard, shards), *map(_residual, residuals)):
        if entry[0] in seen:
            raise ModelLoadError(
                f"{entry[1]}: tensor {entry[0]!r} is stored twice; name one quantization's shards with --from-uqff"
            )
        seen.add(entry[0])
        yield entry


@contextmanager
def _open(file: Path) -> Iterator[Any]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"{file} is not a readable mistral.rs UQFF file ({exc}); it may be truncated") from None


def _shard(file: Path) -> Iterator[StoredTensor]:
    with _open(file) as handle:
        names = set(handle.keys())
        _check_version(file, handle, names)
        for tag in sorted(name for name in names if name.endswith(FORMAT)):
            key = tag.removesuffix(FORMAT)
            yield _weight(file, handle, key, int(handle.get_tensor(tag).item()))
            if f"{key}.bias" in names:
                bias = handle.get_tensor(f"{key}.bias")
                yield f"{key}.bias", file, bias, None, tuple(bias.shape)


def _residual(file: Path) -> Iterator[StoredTensor]:
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing; mistral.rs UQFF shards need the residual file written next to them")
    with _open(file) as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = handle.get_tensor(name)
            yield name, file, tensor, None, tuple(tensor.shape)


def _check_version(file: Path, handle: Any, names: set[str]) -> None:
    if not names.issuperset(VERSION_KEYS):
        raise ModelLoadError(f"{file} has no UQFF version tensors; it is not a mistral.rs UQFF 1.x shard")
    major, minor, patch = (int(handle.get_tensor(key).item()) for key in VERSION_KEYS)
    if major != MAJOR or minor > MINOR:
        raise ModelLoadError(
            f"{file} is mistral.rs UQFF {major}.{minor}.{patch}; idefix reads UQFF {MAJOR}.0 to {MAJOR}.{MINOR}"
        )


def _weight(file: Path, handle: Any, key: str, kind: int) -> StoredTensor:
    name = f"{key}.weight"
    if kind == UNQUANTIZED:
        tensor = handle.get_tensor(name)
        return name, file, tensor, None, tuple(tensor.shape)
    if kind != GGML:
        label = KINDS[kind] if kind < len(KINDS) else f"unknown kind {kind}"
        raise ModelLoadError(
            f"{file}: layer {key!r} is a mistral.rs {label} layer; idefix reads GGML-block (Q4_0 ... Q8_K) "
            "and unquantized layers only"
        )
    code = int(handle.get_tensor(f"{name}.dtype").item())
    shape = tuple(int(n) for n in handle.get_tensor(f"{name}.shape").tolist())
    data = handle.get_tensor(name)
    if code in GGML_FLOATS:  # a layer mistral.rs kept in floats, stored as raw bytes
        dtype = GGML_FLOATS[code]
        _check_bytes(file, key, data, math.prod(shape) * dtype.itemsize, str(dtype).removeprefix("torch."), shape)
        return name, file, data.view(dtype).reshape(shape), None, shape
    try:
        qtype = GGMLType(code)
    except ValueError:
        raise ModelLoadError(f"{file}: layer {key!r} has ggml type {code}, which idefix does not read") from None
    if len(shape) != 2 or shape[1] % qtype.block_size:
        raise ModelLoadError(f"{file}: layer {key!r} has shape {list(shape)}, which {qtype.name} blocks cannot hold")
    _check_bytes(file, key, data, shape[0] * shape[1] // qtype.block_size * qtype.type_size, qtype.name, shape)
    return name, file, data.reshape(shape[0], -1), qtype, shape


def _check_bytes(file: Path, key: str, data: torch.Tensor, size: int, label: str, shape: tuple[int, ...]) -> None:
    if data.dtype != torch.uint8 or data.numel() != size:
        raise ModelLoadError(
            f"{file}: layer {key!r} holds {data.numel()} {data.dtype} values, not the {size} bytes of {label} "
            f"{list(shape)}; the file is corrupt"
        )
