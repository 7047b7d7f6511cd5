"""The device plan as data: both mistral.rs syntaxes, their bad inputs, automatic placement on simulated memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from idefix.device_map import (
    GIB,
    DeviceMapError,
    DevicePlan,
    LayerPlacement,
    ModelSizes,
    auto_plan,
    hop,
    parse_num_device_layers,
    parse_topology,
)
from idefix.errors import IdefixError
from idefix.model.config import Idefics3Config, TextConfig, VisionConfig
from idefix.model.idefics3 import Idefics3Model

TWO_GPUS = ["cuda:0", "cuda:1"]
IDEFICS3_8B = Idefics3Config(
    vision=VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=364, patch_size=14,
    ),
    text=TextConfig(
        vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    ),
)  # fmt: skip


def devices(plan: DevicePlan) -> list[str]:
    return [p.device for p in plan.layers]


# --num-device-layers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0:16;1:16", ["cuda:0"] * 16 + ["cuda:1"] * 16),
        ("16", ["cuda:0"] * 16 + ["cpu"] * 16),  # a bare count: the first device, the rest on CPU
        ("0:16", ["cuda:0"] * 16 + ["cpu"] * 16),  # counts short of the model: the rest on CPU
        ("0:10;cpu:22", ["cuda:0"] * 10 + ["cpu"] * 22),
        ("cpu:2; 1:20 ;0:10", ["cpu"] * 2 + ["cuda:1"] * 20 + ["cuda:0"] * 10),  # order as written
        ("cuda:1:8;cuda[0]:24", ["cuda:1"] * 8 + ["cuda:0"] * 24),
        ("0:0;1:32", ["cuda:1"] * 32),
    ],
)
def test_num_device_layers(spec: str, expected: list[str]) -> None:
    plan = parse_num_device_layers(spec, 32, TWO_GPUS, isq="Q8_0")
    assert devices(plan) == expected
    assert plan.main_device == "cuda:0"
    assert {p.isq for p in plan.layers} == {"Q8_0"}


def test_num_device_layers_on_a_cpu_only_machine() -> None:
    plan = parse_num_device_layers("16", 32, [])
    assert plan == DevicePlan.single(32, "cpu")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0:40", "places 40 layers but the model has 32 text layers"),
        ("0:16;1:17", "places 33 layers"),
        ("40", "places 40 layers"),
        ("3:16", "device 3 is not available (available: cuda:0, cuda:1, cpu)"),
        ("cuda:3:4", "device 'cuda:3' is not available"),
        ("tpu:0:4", "device 'tpu:0' is not available"),
        ("0:16;1:x", "'1:x' is not DEVICE:COUNT"),
        ("0:-4", "'0:-4' is not DEVICE:COUNT"),
        ("0-16", "'0-16' is not DEVICE:COUNT"),
        ("0:16;", "'' is not DEVICE:COUNT"),
        ("", "'' is not DEVICE:COUNT"),
        (":16", "':16' is not DEVICE:COUNT"),
        ("gpu!:4", "'gpu!' is not a device name"),
    ],
)
def test_num_device_layers_bad_input(spec: str, message: str) -> None:
    with pytest.raises(DeviceMapError, match="--num-device-layers") as info:
        parse_num_device_layers(spec, 32, TWO_GPUS)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, IdefixError)


# --topology

TOPOLOGY = """
0-8: {isq: Q8_0}
8-16:
  isq: q4k
  device: cpu
16-24: {device: "cuda[1]"}
30: {isq: none}
"""


def test_topology_ranges_are_half_open_and_gaps_keep_the_defaults() -> None:
    plan = parse_topology(TOPOLOGY, 32, "Q6K", "cuda:0", available=TWO_GPUS)
    assert devices(plan) == ["cuda:0"] * 8 + ["cpu"] * 8 + ["cuda:1"] * 8 + ["cuda:0"] * 8
    isqs = [plan.isq_for(i) for i in range(32)]
    assert isqs == ["Q8_0"] * 8 + ["Q4K"] * 8 + ["Q6K"] * 14 + [None] + ["Q6K"]
    assert plan.main_device == "cuda:0"
    assert plan.device_for(8) == "cpu" and plan.device_for(7) == "cuda:0"
    with pytest.raises(IndexError):
        plan.device_for(32)


def test_topology_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.yml"
    path.write_text(TOPOLOGY)
    expected = parse_topology(TOPOLOGY, 32, None, "cuda:0")
    assert parse_topology(path, 32, None, "cuda:0") == expected
    assert parse_topology(str(path), 32, None, "cuda:0") == expected


def test_topology_isq_names_follow_the_caller() -> None:
    text = "0-4: {isq: q4_k}\n4-8: {isq: Q8_0}"
    plan = parse_topology(text, 8, None, "cpu", valid_isq={"Q4_K", "Q8_0"})
    assert [p.isq for p in plan.layers] == ["Q4_K"] * 4 + ["Q8_0"] * 4
    plan = parse_topology("0-8: {isq: 4}", 8, None, "cpu", valid_isq=lambda name: name in {"4", "8"})
    assert plan.isq_for(0) == "4"
    with pytest.raises(DeviceMapError, match=r"unknown ISQ 'Q4K' \(known: Q8_0\)"):
        parse_topology("0-8: {isq: Q4K}", 8, None, "cpu", valid_isq=["Q8_0"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0-8: {isq: Q8_0}\n4-12: {device: cpu}", "topology range '4-12' overlaps range '0-8'"),
        ("0-8: {isq: Q8_0}\n0-8: {device: cpu}", "key '0-8' is given twice"),
        ("0-8: {isq: Q8_0, isq: Q4K}", "key 'isq' is given twice"),
        ("24-40: {device: cpu}", "topology range '24-40' ends past the model's 32 text layers"),
        ("32: {device: cpu}", "topology range '32' ends past the model's 32 text layers"),
        ("8-8: {device: cpu}", "topology range '8-8' is empty"),
        ("0-: {device: cpu}", "topology range '0-' is not START-END"),
        ("a-b: {device: cpu}", "topology range 'a-b' is not START-END"),
        ("0-8: {device: cuda:3}", "topology range '0-8': device 'cuda:3' is not available"),
        ("0-8: {device: 2}", "topology range '0-8': device 2 is not available (available: cuda:0, cuda:1, cpu)"),
        ("0-8: {device: 'cuda(0)'}", "'cuda(0)' is not a device name"),
        ("0-8: {isq: Q9_9}", "topology range '0-8': unknown ISQ 'Q9_9' (known: Q4_0"),
        ("0-8: {devcie: cpu}", "topology range '0-8': unknown setting 'devcie' (expected isq, device)"),
        ("0-8: cpu", "topology range '0-8': unknown setting '(not a mapping)'"),
        ("0-8: {isq: [", "topology is not valid YAML"),
        ("", "topology must map layer ranges to settings"),
        ("- 0-8\n- 8-16", "topology must map layer ranges to settings"),
        ("missing.yaml", "topology file missing.yaml cannot be read"),
    ],
)
def test_topology_bad_input(text: str, message: str) -> None:
    with pytest.raises(DeviceMapError) as info:
        parse_topology(text, 32, None, "cuda:0", available=TWO_GPUS)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_topology_main_device_must_exist() -> None:
    with pytest.raises(DeviceMapError, match="main device: device 'cuda:0' is not available"):
        parse_topology("0-8: {device: cpu}", 8, None, "cuda:0", available=[])


# sizes and automatic placement


def test_sizes_match_the_model_built_on_meta() -> None:
    with torch.device("meta"):
        model = Idefics3Model(IDEFICS3_8B)
    layer_params = sum(p.numel() for p in model.model.text_model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    sizes = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, max_seq_len=4096, max_seqs=2)
    assert sizes.layer_bytes == 2 * layer_params
    assert sizes.non_layer_bytes == 2 * (total - 32 * layer_params)
    assert sizes.kv_bytes_per_layer == 2 * 8 * 128 * 4096 * 2 * 2  # K+V, kv heads, head_dim, tokens, seqs, bf16
    assert 15.5 < (sizes.non_layer_bytes + 32 * sizes.layer_bytes) / GIB < 16  # "~17 GB" (16.9e9 bytes) in bf16


def test_isq_sizes_cost_each_range() -> None:
    dense = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16)
    q8 = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, "Q8_0")
    q4 = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, "q4k")
    assert q8.non_layer_bytes == dense.non_layer_bytes  # ISQ packs the text projections only
    assert q8.layer_bytes == pytest.approx(dense.layer_bytes * 34 / 64, rel=1e-3)
    assert q4.layer_bytes == pytest.approx(dense.layer_bytes * 144 / 512, rel=1e-3)
    # Sizes made for one ISQ cost another range's ISQ (a topology plan's table).
    assert q8.bytes_for_layer("Q4K") == q4.layer_bytes and q4.bytes_for_layer(None) == dense.layer_bytes
    with pytest.raises(DeviceMapError, match="ISQ 'Q9' has no known size"):
        ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, "Q9")


SMALL = ModelSizes(non_layer_bytes=3 * GIB, layer_bytes=GIB, kv_bytes_per_layer=0)


def test_auto_plan_fills_gpus_in_order_then_cpu() -> None:
    plan = auto_plan(SMALL, {"cuda:0": 10 * GIB, "cuda:1": 10 * GIB}, 32, reserve_fraction=0.0)
    assert devices(plan) == ["cuda:0"] * 7 + ["cuda:1"] * 10 + ["cpu"] * 15
    assert plan.main_device == "cuda:0"
    plan = auto_plan(SMALL, {"cuda:0": 10 * GIB}, 32, reserve_fraction=0.5, isq="Q4K")
    assert devices(plan) == ["cuda:0"] * 2 + ["cpu"] * 30 and plan.isq_for(0) == "Q4K"
    plan = auto_plan(SMALL, {"cuda:0": 100 * GIB, "cpu": 1}, 32)  # everything on the GPU: CPU memory unused
    assert plan == DevicePlan.single(32, "cuda:0")


def test_auto_plan_counts_the_kv_cache_on_each_layers_device() -> None:
    sizes = ModelSizes(non_layer_bytes=0, layer_bytes=GIB, kv_bytes_per_layer=GIB)
    assert devices(auto_plan(sizes, {"cuda:0": 10 * GIB}, 8, 0.0)) == ["cuda:0"] * 5 + ["cpu"] * 3


def test_auto_plan_without_gpus_uses_cpu() -> None:
    assert auto_plan(SMALL, {}, 4) == DevicePlan.single(4, "cpu")
    assert auto_plan(SMALL, {"cpu": 64 * GIB}, 4) == DevicePlan.single(4, "cpu")


def test_a_plan_that_does_not_fit_names_the_numbers() -> None:
    with pytest.raises(DeviceMapError) as info:
        auto_plan(SMALL, {"cuda:0": 10 * GIB, "cpu": 20 * GIB}, 32, reserve_fraction=0.0)
    assert str(info.value) == (
        "the model does not fit: cuda:0: 7 layers + non-layer weights need 10.00 GiB, 10.00 GiB available; "
        "cpu: 25 layers need 25.00 GiB, 20.00 GiB available (free memory minus a 0% reserve); "
        "use a smaller --isq, a lower --max-seq-len / --max-seqs, or free memory"
    )
    with pytest.raises(DeviceMapError, match="cuda:0: 0 layers \\+ non-layer weights need 3.00 GiB, 1.80 GiB"):
        auto_plan(SMALL, {"cuda:0": 2 * GIB, "cpu": 2 * GIB}, 32)


# Idefics3-8B in bf16 (the closing-note cases), 4096 tokens x 1 sequence of KV cache.

SIZES_8B = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, max_seq_len=4096, max_seqs=1)


def test_idefics3_8b_on_a_12_gib_gpu() -> None:
    plan = auto_plan(SIZES_8B, {"cuda:0": 12 * GIB}, 32)
    print(f"\nIdefics3-8B bf16, one 12 GiB GPU (10% reserve):\n{plan.table()}")
    assert devices(plan) == ["cuda:0"] * 19 + ["cpu"] * 13
    assert plan.table().splitlines()[2].startswith("cuda:0 | 0-19 (19)")


def test_idefics3_8b_q8_0_fits_a_12_gib_gpu() -> None:
    sizes = ModelSizes.from_config(IDEFICS3_8B, torch.bfloat16, "Q8_0", max_seq_len=4096, max_seqs=1)
    plan = auto_plan(sizes, {"cuda:0": 12 * GIB}, 32, isq="Q8_0")
    print(f"\nIdefics3-8B --isq Q8_0, one 12 GiB GPU (10% reserve):\n{plan.table()}")
    assert plan == DevicePlan.single(32, "cuda:0", "Q8_0")


def test_idefics3_8b_on_two_8_gib_gpus() -> None:
    plan = auto_plan(SIZES_8B, {"cuda:0": 8 * GIB, "cuda:1": 8 * GIB}, 32)
    print(f"\nIdefics3-8B bf16, two 8 GiB GPUs (10% reserve):\n{plan.table()}")
    assert devices(plan) == ["cuda:0"] * 10 + ["cuda:1"] * 17 + ["cpu"] * 5


def test_idefics3_8b_does_not_fit_with_little_cpu_memory() -> None:
    with pytest.raises(DeviceMapError) as info:
        auto_plan(SIZES_8B, {"cuda:0": 8 * GIB, "cuda:1": 8 * GIB, "cpu": 2 * GIB}, 32)
    print(f"\n{info.value}")
    assert "cpu: 5 layers need 2.11 GiB, 1.80 GiB available" in str(info.value)


def test_table_of_a_topology_costs_each_ranges_isq() -> None:
    plan = parse_topology("0-16: {isq: Q8_0}\n16-32: {isq: Q4K, device: cpu}", 32, None, "cuda:0")
    table = plan.table(SIZES_8B)
    print(f"\nIdefics3-8B topology (Q8_0 on cuda:0, Q4K on cpu):\n{table}")
    gpu, cpu = ([cell.strip() for cell in line.split(" | ")] for line in table.splitlines()[2:4])
    assert gpu[:3] == ["cuda:0", "0-16 (16)", "Q8_0"] and cpu[:3] == ["cpu", "16-32 (16)", "Q4K"]
    expected_cpu = 16 * SIZES_8B.bytes_for_layer("Q4K") / GIB
    assert float(cpu[3]) == pytest.approx(expected_cpu, abs=0.01)
    assert "?" in DevicePlan.single(2, "cpu").table()  # no sizes: the layout alone


def test_plans_are_checked_data() -> None:
    with pytest.raises(ValueError, match="layers 0..n-1"):
        DevicePlan((LayerPlacement(1, "cpu", None),), "cpu")
    plan = parse_num_device_layers("0:1;cpu:1", 2, ["cuda:0"])
    assert plan.devices == ["cuda:0", "cpu"] and plan.layers[1] == LayerPlacement(1, "cpu", None)


def test_hop_moves_only_when_needed() -> None:
    x = torch.ones(2, 3)
    assert hop(x, "cpu") is x and hop(x, torch.device("cpu")) is x
    moved = hop(x, "meta")
    assert moved.device.type == "meta" and moved.shape == x.shape
    assert hop(moved, "meta") is moved
