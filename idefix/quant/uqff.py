"""UQFF files: pre-quantized weights in safetensors containers (layout in docs/uqff.md).

A UQFF folder is a complete hub-style model: config / tokenizer / processor files, `model-0000K-of-0000N.uqff`
shards holding GGML blocks (uint8 [rows, bytes per row]) under their checkpoint names, `residual.uqff`
holding the unquantized rest, and a README.md model card. Every file's metadata names the format version,
the producer, the source model, its revision and config hash, and per tensor: GGML type, logical shape,
block layout and a sha256 of its bytes. Anything that does not check out is a ModelLoadError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from idefix import __version__
from idefix.errors import ModelLoadError
from idefix.quant.ggml import GGMLType

UQFF_FORMAT = "idefix-uqff"
UQFF_VERSION = 1
RESIDUAL = "residual.uqff"
# (name, file, tensor, GGML type or None for an unquantized tensor, logical shape): what UQFF readers yield
StoredTensor = tuple[str, Path, torch.Tensor, GGMLType | None, tuple[int, ...]]
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


def config_digest(model_dir: Path) -> str:
    """sha256 of config.json's content (canonical JSON), tying UQFF files to the model they came from."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _raw(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is contiguous."""
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy().data


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(_raw(tensor)).hexdigest()


@dataclass(frozen=True)
class Source:
    model_id: str
    revision: str | None
    config_sha256: str


SAFETENSORS_DTYPES = {
    torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64", torch.bool: "BOOL",
}  # fmt: skip


class StreamingSafetensors:
    """A safetensors file written one tensor at a time, holding none of them: data goes to `<path>.part` as it
    comes, and `close` writes the header (which must list every offset and the metadata first) followed by a
    chunked copy of the data. safetensors' own `save_file` needs every tensor in memory at once, which is what
    quantizing layer by layer is meant to avoid; the files are read back with safetensors itself."""

    def __init__(self, path: Path) -> None:
        self.path, self.part = path, path.with_name(path.name + ".part")
        self.data = self.part.open("wb")
        self.header: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> str:
        """Append `tensor`; returns the sha256 of its bytes."""
        raw = _raw(tensor)
        self.data.write(raw)
        self.header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
            "data_offsets": [self.size, self.size + raw.nbytes],
        }  # fmt: skip
        self.size += raw.nbytes
        return hashlib.sha256(raw).hexdigest()

    def close(self, metadata: dict[str, str]) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with self.path.open("wb") as out, self.part.open("rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self.part.unlink()

    def discard(self) -> None:
        """Delete the file and its partial data (a run that failed or was interrupted)."""
        self.data.close()
        self.part.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


class UqffWriter:
    """Writes tensors as they are quantized: shards of at most `shard_bytes` of GGML blocks, and the residual
    (every tensor kept unquantized, in the dtype it was given). Memory use stays at one tensor.
    Used as a context manager, a run that raises (or is interrupted) leaves no weight files behind."""

    def __init__(self, out_dir: str | Path, source: Source, shard_bytes: int = 2 * 2**30) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.source, self.shard_bytes = source, shard_bytes
        self.shard: StreamingSafetensors | None = None
        self.entries: dict[str, dict] = {}
        self.residual = StreamingSafetensors(self.out / RESIDUAL)
        self.residual_entries: dict[str, dict] = {}
        self.shards: list[Path] = []
        self.types: set[str] = set()

    def __enter__(self) -> UqffWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        """Delete every weight file written so far, so that no half-written UQFF folder is left to load."""
        for stream in (self.shard, self.residual):
            if stream is not None:
                stream.discard()
        for path in self.shards:
            path.unlink(missing_ok=True)

    def add_quantized(self, name: str, qtype: GGMLType, data: torch.Tensor, shape: tuple[int, ...]) -> None:
        if self.shard is None:
            self.shard = StreamingSafetensors(self.out / f"model-{len(self.shards) + 1:05d}.uqff")
        self.entries[name] = {
            "type": qtype.name, "shape": list(shape), "block_size": qtype.block_size,
            "type_size": qtype.type_size, "sha256": self.shard.add(name, data),
        }  # fmt: skip
        self.types.add(qtype.name)
        if self.shard.size >= self.shard_bytes:
            self._flush()

    def add_residual(self, name: str, tensor: torch.Tensor) -> None:
        dtype = str(tensor.dtype).removeprefix("torch.")
        self.residual_entries[name] = {
            "type": dtype,
            "shape": list(tensor.shape),
            "sha256": self.residual.add(name, tensor),
        }

    def _flush(self) -> None:
        if self.shard is None:
            return
        self.shard.close(self._metadata(self.entries))
        self.shards.append(self.shard.path)
        self.shard, self.entries = None, {}

    def _metadata(self, entries: dict[str, dict]) -> dict[str, str]:
        return {
            "format": UQFF_FORMAT, "uqff_version": str(UQFF_VERSION), "producer": f"idefix {__version__}",
            "source_model": self.source.model_id, "source_revision": self.source.revision or "",
            "source_config_sha256": self.source.config_sha256, "tensors": json.dumps(entries),
        }  # fmt: skip

    def close(self, source_dir: Path) -> list[Path]:
        """Write what is left, the residual file, the side files and a model card; return the weight files."""
        self._flush()
        total = len(self.shards)
        for index, path in enumerate(self.shards, start=1):  # final names: model-0000K-of-0000N.uqff
            final = path.with_name(f"model-{index:05d}-of-{total:05d}.uqff")
            path.rename(final)
            self.shards[index - 1] = final
        self.residual.close(self._metadata(self.residual_entries))
        for name in SIDE_FILES:
            if (source_dir / name).exists() and not (self.out / name).exists():
                shutil.copyfile(source_dir / name, self.out / name)
        self._model_card()
        return [*self.shards, self.out / RESIDUAL]

    def _model_card(self) -> None:
        (self.out / "README.md").write_text(
            f"# {self.source.model_id} (UQFF, {', '.join(sorted(self.types)) or 'unquantized'})\n\n"
            f"Pre-quantized with idefix {__version__} from `{self.source.model_id}`"
            f"{' at ' + self.source.revision if self.source.revision else ''}.\n\n"
            f"Run it: `idefix chat -m {self.out}` (or `--from-uqff` with the original model).\n"
            "Format: docs/uqff.md in the idefix repository.\n"
        )


def uqff_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.uqff"))


def read_uqff(files: Sequence[Path], config_sha256: str) -> Iterator[StoredTensor]:
    """(name, file, tensor, GGML type or None for a residual tensor, logical shape) for every tensor."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                entries = _check_header(file, handle.metadata() or {}, config_sha256)
                for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield _checked(file, name, handle.get_tensor(name), entries)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable UQFF file ({exc}); it may be truncated") from None


def _check_header(file: Path, meta: dict[str, str], config_sha256: str) -> dict[str, dict]:
    if meta.get("format") != UQFF_FORMAT:
        raise ModelLoadError(
            f"{file} is neither an idefix UQFF file (format {meta.get('format')!r}) nor a mistral.rs UQFF 1.x shard"
        )
    if meta.get("uqff_version") != str(UQFF_VERSION):
        raise ModelLoadError(
            f"{file} has UQFF version {meta.get('uqff_version')!r}; this idefix reads version {UQFF_VERSION}"
        )
    if meta.get("source_config_sha256") != config_sha256:
        raise ModelLoadError(
            f"{file} was made from another model ({meta.get('source_model')!r}): its config does not match this one"
        )
    try:
        entries = json.loads(meta["tensors"])
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{file} has no readable tensor table: {exc}") from None
    return entries if isinstance(entries, dict) else {}


def _checked(file: Path, name: str, tensor: torch.Tensor, entries: dict[str, dict]) -> StoredTensor:
    entry = entries.get(name)
    if entry is None:
        raise ModelLoadError(f"{file}: tensor {name!r} is not in the file's tensor table")
    if _sha256(tensor) != entry.get("sha256"):
        raise ModelLoadError(f"{file}: tensor {name!r} fails its checksum; the file is corrupt")
    shape = tuple(int(n) for n in entry.get("shape", []))
    if "block_size" not in entry:
        return name, file, tensor, None, shape
    try:
        qtype = GGMLType[entry["type"]]
    except KeyError:
        raise ModelLoadError(f"{file}: tensor {name!r} has quantization type {entry['type']!r}, unknown here") from None
    if tensor.dtype != torch.uint8 or tensor.shape[-1] * qtype.block_size != shape[-1] * qtype.type_size:
        raise ModelLoadError(f"{file}: tensor {name!r} does not hold {qtype.name} blocks of shape {shape}")
    return name, file, tensor, qtype, shape
