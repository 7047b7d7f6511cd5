"""The device plan: which device (and which ISQ) holds each text decoder layer — data, not model code.

Only the text model's decoder layers are mapped; the vision tower, connector, embeddings, final norm
and lm_head stay on `main_device`. Three ways to get a plan, all mistral.rs-compatible:
- `parse_num_device_layers("0:16;1:16", ...)`: counts per device in order; `"16"` = 16 on the first
  device; layers left over go to CPU; `cpu` is a valid target.
- `parse_topology(yaml)`: half-open layer ranges (`0-8` = layers 0..7) -> `{isq, device}`, either optional;
  uncovered layers keep `main_device` and the global ISQ; `isq: none` forces an unquantized range.
- `auto_plan(sizes, free_bytes, ...)`: fill GPUs in order from free memory, offload the rest to CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from idefix.errors import IdefixError
from idefix.model.config import Idefics3Config

GIB = 2**30
# GGML block formats: bytes per block / weights per block (mistral.rs ISQ names).
ISQ_BYTES_PER_WEIGHT: dict[str, float] = {
    "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q5_0": 22 / 32, "Q5_1": 24 / 32, "Q8_0": 34 / 32, "Q8_1": 36 / 32,
    "Q2K": 84 / 256, "Q3K": 110 / 256, "Q4K": 144 / 256, "Q5K": 176 / 256, "Q6K": 210 / 256, "Q8K": 292 / 256,
}  # fmt: skip
IsqCheck = Collection[str] | Callable[[str], bool]
_DEVICE = re.compile(r"^([a-z]+)(?::(\d+)|\[(\d+)\])?$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


class DeviceMapError(IdefixError):
    """A --num-device-layers / --topology value is malformed, or the model does not fit the devices."""


def _key(isq: str) -> str:
    return isq.upper().replace("_", "")


def isq_bytes_per_weight(isq: str) -> float | None:
    """Bytes per packed weight of a GGML-style ISQ name (`Q4K`, `q4_k`, `Q8_0`...); None if not in the table."""
    return {_key(name): bpw for name, bpw in ISQ_BYTES_PER_WEIGHT.items()}.get(_key(isq))


@dataclass(frozen=True)
class ModelSizes:
    """The bytes that decide a placement (`from_config` computes them from a checkpoint's config).

    non_layer_bytes: vision tower + connector + embeddings + final norm + lm_head, all on the main device.
    layer_bytes: one text decoder layer after the global ISQ.
    kv_bytes_per_layer: K and V of one layer for max_seq_len x max_seqs tokens.
    layer_linear_params / layer_linear_bpw / dense_bpw: the projection weights of one layer, their bytes
        per weight inside `layer_bytes`, and the dtype's; they let a per-range ISQ be costed (0 = not modelled).
    """

    non_layer_bytes: int
    layer_bytes: int
    kv_bytes_per_layer: int
    layer_linear_params: int = 0
    layer_linear_bpw: float = 0.0
    dense_bpw: float = 2.0

    def bytes_for_layer(self, isq: str | None) -> int:
        bpw = self.dense_bpw if isq is None else isq_bytes_per_weight(isq)
        if not self.layer_linear_params or bpw is None:
            return self.layer_bytes
        return round(self.layer_bytes + self.layer_linear_params * (bpw - self.layer_linear_bpw))

    @classmethod
    def from_config(
        cls, config: Idefics3Config, dtype: torch.dtype = torch.bfloat16, isq: str | float | None = None,
        *, max_seq_len: int = 4096, max_seqs: int = 1, kv_dtype: torch.dtype | None = None,
    ) -> ModelSizes:  # fmt: skip
        """`isq`: an ISQ name from ISQ_BYTES_PER_WEIGHT or bytes per weight; it packs the text projections only."""
        text, vision, dense = config.text, config.vision, dtype.itemsize
        bpw = float(dense) if isq is None else isq if isinstance(isq, float) else isq_bytes_per_weight(isq)
        if bpw is None:
            raise DeviceMapError(f"ISQ {isq!r} has no known size (known: {', '.join(ISQ_BYTES_PER_WEIGHT)})")
        q, kv = text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim
        linear = 2 * text.hidden_size * (q + kv) + 3 * text.hidden_size * text.intermediate_size
        biases = (q + 2 * kv + text.hidden_size) * text.attention_bias
        biases += (2 * text.intermediate_size + text.hidden_size) * text.mlp_bias
        layer = linear * bpw + (2 * text.hidden_size + biases) * dense  # two RMS norms + biases stay dense
        v, vi = vision.hidden_size, vision.intermediate_size
        vision_layer = 4 * (v * v + v) + 2 * v * vi + vi + v + 4 * v  # attention, mlp, two layer norms
        patches = vision.num_channels * vision.patch_size**2 * v + v + vision.patches_per_side**2 * v
        connector = text.hidden_size * v * config.scale_factor**2
        embeddings = text.vocab_size * text.hidden_size * (1 if config.tie_word_embeddings else 2)
        non_layer = vision.num_hidden_layers * vision_layer + patches + 2 * v + connector + embeddings
        kv_item = (kv_dtype or dtype).itemsize
        return cls(
            non_layer_bytes=(non_layer + text.hidden_size) * dense,  # + the final norm
            layer_bytes=round(layer),
            kv_bytes_per_layer=2 * kv * max_seq_len * max_seqs * kv_item,
            layer_linear_params=linear,
            layer_linear_bpw=bpw,
            dense_bpw=float(dense),
        )


@dataclass(frozen=True)
class LayerPlacement:
    layer: int  # text decoder layer index
    device: str  # torch device name: "cpu", "cuda:1"
    isq: str | None  # ISQ of this layer's projections; None = unquantized (the model dtype)


@dataclass(frozen=True)
class DevicePlan:
    layers: tuple[LayerPlacement, ...]  # one per text decoder layer, in order
    main_device: str  # vision tower, connector, embeddings, final norm, lm_head
    sizes: ModelSizes | None = field(default=None, compare=False)  # for table(); set by auto_plan

    def __post_init__(self) -> None:
        if [p.layer for p in self.layers] != list(range(len(self.layers))):
            raise ValueError("DevicePlan.layers must hold layers 0..n-1 in order")

    @classmethod
    def single(cls, num_layers: int, device: str, isq: str | None = None) -> DevicePlan:
        return cls(tuple(LayerPlacement(i, device, isq) for i in range(num_layers)), device)

    @property
    def devices(self) -> list[str]:
        """The main device first, then every other device in layer order."""
        return list(dict.fromkeys([self.main_device, *(p.device for p in self.layers)]))

    def device_for(self, layer: int) -> str:
        return self._at(layer).device

    def isq_for(self, layer: int) -> str | None:
        return self._at(layer).isq

    def _at(self, layer: int) -> LayerPlacement:
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"layer {layer} is outside the plan's {len(self.layers)} layers")
        return self.layers[layer]

    def table(self, sizes: ModelSizes | None = None) -> str:
        """device | layers (half-open ranges, as in a topology file) | isq | weights GiB | KV GiB."""
        sizes = sizes or self.sizes
        rows = [("device", "layers", "isq", "weights GiB", "KV GiB")]
        for device in self.devices:
            mine = [p for p in self.layers if p.device == device]
            weights = kv = "?"
            if sizes is not None:
                main = sizes.non_layer_bytes if device == self.main_device else 0
                weights = f"{(main + sum(sizes.bytes_for_layer(p.isq) for p in mine)) / GIB:.2f}"
                kv = f"{len(mine) * sizes.kv_bytes_per_layer / GIB:.2f}"
            isqs = ", ".join(dict.fromkeys(p.isq or "-" for p in mine)) or "-"
            rows.append((device, _ranges([p.layer for p in mine]), isqs, weights, kv))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [
            " | ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join([*lines, f"{self.main_device} also holds the vision tower, connector, embeddings, lm_head"])


def _ranges(layers: list[int]) -> str:
    runs: list[list[int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer:
            runs[-1][1] = layer + 1
        else:
            runs.append([layer, layer + 1])
    return ", ".join(f"{a}-{b}" for a, b in runs) + f" ({len(layers)})" if runs else "-"


def hop(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """`x` on `device`, copied only when it lives elsewhere (activations crossing a range boundary)."""
    target = torch.device(device)
    same = x.device.type == target.type and target.index in (None, x.device.index)
    # Non-blocking only towards an accelerator: a device-to-host copy must finish before the CPU reads it.
    return x if same else x.to(target, non_blocking=target.type != "cpu")


def _device_name(token: str, available: Sequence[str] | None, where: str) -> str:
    """`cpu`, an ordinal `1`, `cuda:1` or mistral.rs's `cuda[1]` -> a torch device name, checked if `available`."""
    text = token.strip().lower()
    match = _DEVICE.match(f"cuda:{text}" if text.isdigit() else text)
    if match is None:
        raise DeviceMapError(f"{where}: {token!r} is not a device name (use cpu, 0, cuda:0 or cuda[0])")
    kind, index = match.group(1), int(match.group(2) or match.group(3) or 0)
    name = "cpu" if kind == "cpu" else f"{kind}:{index}"
    gpus = [g for g in (_device_name(a, None, "available devices") for a in available or []) if g != "cpu"]
    if text.isdigit():  # an ordinal names the accelerator with that index, whatever its kind
        name = next((g for g in gpus if g.endswith(f":{index}")), name)
    if name != "cpu" and available is not None and name not in gpus:
        shown = index if text.isdigit() else repr(token.strip())
        raise DeviceMapError(f"{where}: device {shown} is not available (available: {', '.join([*gpus, 'cpu'])})")
    return name


def parse_num_device_layers(
    spec: str, num_layers: int, available: Sequence[str], *, isq: str | None = None
) -> DevicePlan:
    """mistral.rs `--num-device-layers`: `"0:16;1:16"`, `"cpu:8;0:24"`, or `"16"` (16 on the first device).

    Layers are handed out in the order written; layers left over go to CPU. `available`: the accelerators
    that exist (`["cuda:0", "cuda:1"]`, empty on a CPU-only machine); the first one is the main device.
    """
    gpus = [g for g in (_device_name(a, None, "available devices") for a in available) if g != "cpu"]
    first, where = (gpus[0] if gpus else "cpu"), f"--num-device-layers {spec!r}"
    parts = [f"{first}:{spec}"] if spec.strip().isdigit() else spec.split(";")
    devices: list[str] = []
    for part in parts:
        name, sep, count = part.strip().rpartition(":")
        if not sep or not name or not count.strip().isdigit():
            raise DeviceMapError(f"{where}: {part.strip()!r} is not DEVICE:COUNT (e.g. 0:16;1:16 or cpu:8)")
        devices += [_device_name(name, gpus, where)] * int(count)
    if len(devices) > num_layers:
        raise DeviceMapError(f"{where} places {len(devices)} layers but the model has {num_layers} text layers")
    devices += ["cpu"] * (num_layers - len(devices))
    return DevicePlan(tuple(LayerPlacement(i, d, isq) for i, d in enumerate(devices)), first)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise DeviceMapError(f"topology: key {repeated[0]!r} is given twice")
        return super().construct_mapping(node, deep=deep)


def _load_topology(path_or_text: str | Path) -> dict[Any, Any]:
    text = str(path_or_text)
    is_path = isinstance(path_or_text, Path) or ("\n" not in text and text.endswith((".yml", ".yaml")))
    try:
        raw = yaml.load(Path(text).read_text() if is_path else text, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise DeviceMapError(f"topology file {text} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise DeviceMapError(f"topology is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict) or not raw:
        raise DeviceMapError("topology must map layer ranges to settings, e.g. '0-8: {isq: Q8_0, device: cpu}'")
    return raw


def _isq_name(value: Any, valid_isq: IsqCheck | None, where: str) -> str | None:
    name = str(value).strip()
    if name.lower() == "none":
        return None
    if callable(valid_isq):
        if valid_isq(name):
            return name
        known: Collection[str] = ()
    else:
        known = ISQ_BYTES_PER_WEIGHT if valid_isq is None else valid_isq
        match = [k for k in known if _key(k) == _key(name)]
        if match:
            return match[0]
    raise DeviceMapError(f"{where}: unknown ISQ {name!r}" + (f" (known: {', '.join(known)})" if known else ""))


def parse_topology(
    path_or_text: str | Path, num_layers: int, default_isq: str | None, main_device: str,
    *, available: Sequence[str] | None = None, valid_isq: IsqCheck | None = None,
) -> DevicePlan:  # fmt: skip
    """mistral.rs `--topology`: a YAML file (a Path or a `.yml`/`.yaml` name) or YAML text.

    `available` (accelerators that exist) turns on the unknown-device check; `valid_isq` (names or a
    predicate) defaults to the GGML names of ISQ_BYTES_PER_WEIGHT.
    """
    main = _device_name(main_device, available, "main device")
    devices, isqs = [main] * num_layers, [default_isq] * num_layers
    taken: list[tuple[int, int, str]] = []
    for key, value in _load_topology(path_or_text).items():
        where = f"topology range {str(key)!r}"
        match = _RANGE.match(str(key))
        if match is None:
            raise DeviceMapError(f"{where} is not START-END (half-open, e.g. 0-8 = layers 0..7)")
        start, end = int(match.group(1)), int(match.group(2) or int(match.group(1)) + 1)
        if end <= start or end > num_layers:
            why = "is empty" if end <= start else f"ends past the model's {num_layers} text layers"
            raise DeviceMapError(f"{where} {why}")
        clash = next((k for s, e, k in taken if start < e and s < end), None)
        if clash is not None:
            raise DeviceMapError(f"{where} overlaps range {clash!r}")
        taken.append((start, end, str(key)))
        settings = {} if value is None else value
        unknown = set(settings) - {"isq", "device"} if isinstance(settings, dict) else {"(not a mapping)"}
        if unknown:
            raise DeviceMapError(f"{where}: unknown setting {sorted(map(str, unknown))[0]!r} (expected isq, device)")
        for layer in range(start, end):
            if "device" in settings:
                devices[layer] = _device_name(str(settings["device"]), available, where)
            if "isq" in settings:
                isqs[layer] = _isq_name(settings["isq"], valid_isq, where)
    return DevicePlan(tuple(LayerPlacement(i, d, q) for i, (d, q) in enumerate(zip(devices, isqs, strict=True))), main)


def auto_plan(
    sizes: ModelSizes, free_bytes: dict[str, int], num_layers: int, reserve_fraction: float = 0.1,
    *, isq: str | None = None,
) -> DevicePlan:  # fmt: skip
    """Fill the accelerators of `free_bytes` in the order given, then CPU (unbounded unless `free_bytes` has "cpu").

    Each device may use its free bytes minus `reserve_fraction` (activations, allocator slack). The main device
    (the first accelerator, else cpu) takes the non-layer weights first; every layer costs its weights + its KV.
    """
    usable = {_device_name(d, None, "free_bytes"): int(b * (1 - reserve_fraction)) for d, b in free_bytes.items()}
    order = [d for d in usable if d != "cpu"] + ["cpu"]
    main, per_layer = order[0], sizes.layer_bytes + sizes.kv_bytes_per_layer
    used = dict.fromkeys(order, 0)
    used[main] = sizes.non_layer_bytes
    devices: list[str] = []
    for device in order:
        left = num_layers - len(devices)
        take = left if device == "cpu" else max(0, min((usable[device] - used[device]) // per_layer, left))
        devices += [device] * take
        used[device] += take * per_layer
    over = [d for d in order if used[d] > usable.get(d, 2**62)]
    if over:
        report = "; ".join(
            f"{d}: {devices.count(d)} layers{' + non-layer weights' * (d == main)} need {used[d] / GIB:.2f} GiB, "
            f"{usable[d] / GIB:.2f} GiB available"
            for d in order
            if d in usable
        )
        raise DeviceMapError(
            f"the model does not fit: {report} (free memory minus a {reserve_fraction:.0%} reserve); "
            "use a smaller --isq, a lower --max-seq-len / --max-seqs, or free memory"
        )
    return DevicePlan(tuple(LayerPlacement(i, d, isq) for i, d in enumerate(devices)), main, sizes)
