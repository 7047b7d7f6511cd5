"""idefix.processing.image against transformers' Idefics3ImageProcessorPil, image by image.

The reference pads every sample to the same number of tiles with all-zero fake tiles; ours keeps only
real tiles ([T, 3, H, W]), so the reference's real tiles are cut out and concatenated before comparing.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from idefix.processing.image import ImageProcessor, ImageProcessorConfig

pytest.importorskip("transformers")
from transformers.models.idefics3.image_processing_pil_idefics3 import (  # noqa: E402
    Idefics3ImageProcessorPil,
)

TOL = 1e-6  # the contract; in practice every value is bit-identical, which the tests also check
# Hub-style dicts (extra keys included, as the hub ships them); sizes chosen small for speed.
CONFIGS = {
    "split192-64-lanczos": {"size": {"longest_edge": 192}, "max_image_size": {"longest_edge": 64}, "resample": 1},
    # 300 is not a multiple of 128, so step 3 really resizes; ImageNet mean/std are not exact in float32.
    "split300-128-bicubic": {
        "size": {"longest_edge": 300},
        "max_image_size": {"longest_edge": 128},
        "resample": 3,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "processor_class": "Idefics3Processor",
        "image_processor_type": "Idefics3ImageProcessor",
    },
    "nosplit160-96-bilinear": {
        "size": {"longest_edge": 160},
        "max_image_size": {"longest_edge": 96},
        "resample": 2,
        "do_image_splitting": False,
    },
    # No first resize: the tile boundary is hit exactly by the input size.
    "noresize-64-lanczos": {"do_resize": False, "max_image_size": {"longest_edge": 64}, "resample": 1},
}
REF_KEYS = set(Idefics3ImageProcessorPil.valid_kwargs.__annotations__)


def _noise(width: int, height: int, channels: int, seed: int = 0, high: int = 256) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed + width * 7 + height).integers(0, high, shape).astype(np.uint8)


def _rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(_noise(width, height, 3), "RGB")


def _png(image: Image.Image, **save: object) -> Image.Image:
    """Round-trip through PNG bytes: a lazily decoded image as media.py would hand over."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return Image.open(io.BytesIO(buf.getvalue()))


def _rgba(width: int = 90, height: int = 70) -> Image.Image:
    arr = _noise(width, height, 4)
    arr[:10, :, 3] = 0  # fully transparent band: must come out white
    arr[10:20, :, 3] = 255
    return Image.fromarray(arr, "RGBA")


def _palette(transparent: bool) -> Image.Image:
    image = _rgb(80, 50).quantize(colors=16)
    return _png(image, transparency=3) if transparent else _png(image)


def _i16(high: int) -> Image.Image:
    arr = np.random.default_rng(1).integers(0, high, (60, 75)).astype(np.uint16)
    return _png(Image.fromarray(arr))  # mode I;16 (Pillow clips to 255 when going to RGB)


CASES: dict[str, Callable[[], list[Image.Image]]] = {
    "square": lambda: [_rgb(100, 100)],
    "1x1": lambda: [_rgb(1, 1)],
    "3000x20": lambda: [_rgb(3000, 20)],
    "20x3000": lambda: [_rgb(20, 3000)],
    "1x5000": lambda: [_rgb(1, 5000)],
    "5000x1": lambda: [_rgb(5000, 1)],
    "one-tile-64x64": lambda: [_rgb(64, 64)],
    "tile+1-65x64": lambda: [_rgb(65, 64)],
    "tile+1-64x65": lambda: [_rgb(64, 65)],
    "below-tile-63x40": lambda: [_rgb(63, 40)],
    "L": lambda: [Image.fromarray(_noise(77, 51, 1), "L")],
    "L-tRNS": lambda: [_png(Image.fromarray(_noise(40, 30, 1), "L"), transparency=7)],
    "RGB-tRNS": lambda: [_png(_rgb(40, 30).quantize(8).convert("RGB"), transparency=(0, 0, 0))],
    "RGBA": lambda: [_rgba()],
    "LA": lambda: [_rgba().convert("LA")],
    "P": lambda: [_palette(transparent=False)],
    "P-transparency": lambda: [_palette(transparent=True)],
    "PA": lambda: [_rgba(30, 20).convert("PA")],
    "I;16-full-range": lambda: [_i16(65536)],
    "I;16-low-range": lambda: [_i16(400)],
    "I": lambda: [Image.fromarray(np.random.default_rng(2).integers(-300, 600, (30, 40)).astype(np.int32))],
    "F": lambda: [Image.fromarray(np.random.default_rng(3).uniform(-5, 300, (30, 40)).astype(np.float32))],
    "CMYK": lambda: [Image.fromarray(_noise(50, 40, 4), "CMYK")],
    "1": lambda: [_rgb(45, 33).convert("1")],
    "two-images": lambda: [_rgb(120, 40), _rgb(30, 90)],
    "three-images": lambda: [_rgb(1, 1), _rgba(200, 150), Image.fromarray(_noise(64, 130, 1), "L")],
}


def _reference(config: dict, images: list[Image.Image]):
    """Each image its own sample, so samples have different tile counts and get fake tiles."""
    ref = Idefics3ImageProcessorPil(**{k: v for k, v in config.items() if k in REF_KEYS})
    out = ref([[im] for im in images], return_tensors="pt", return_row_col_info=True)
    pixels, mask = out["pixel_values"], out["pixel_attention_mask"]
    rows, cols = [r[0] for r in out["rows"]], [c[0] for c in out["cols"]]
    counts = [r * c + 1 if r else 1 for r, c in zip(rows, cols, strict=True)]
    for i, n in enumerate(counts):  # everything beyond the real tiles is padding
        assert not pixels[i, n:].any() and not mask[i, n:].any()
    real = torch.cat([pixels[i, :n] for i, n in enumerate(counts)])
    real_mask = torch.cat([mask[i, :n] for i, n in enumerate(counts)]).bool()
    return real, real_mask, rows, cols, counts


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(config_name: str, case: str) -> None:
    config = CONFIGS[config_name]
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))(CASES[case]())
    ref_pixels, ref_mask, rows, cols, counts = _reference(config, CASES[case]())

    assert (ours.rows, ours.cols, ours.tiles_per_image) == (rows, cols, counts)
    assert ours.pixel_values.dtype == torch.float32 and ours.pixel_attention_mask.dtype == torch.bool
    assert ours.pixel_values.shape == ref_pixels.shape
    assert (ours.pixel_values - ref_pixels).abs().max().item() <= TOL
    # Bit-identical: catches float32-vs-float64 rescale drift (~6e-8), which TOL alone would not.
    assert torch.equal(ours.pixel_values, ref_pixels)
    assert torch.equal(ours.pixel_attention_mask, ref_mask)


@pytest.mark.parametrize("flags", [{"do_rescale": False}, {"do_normalize": False}, {"do_convert_rgb": False}])
def test_flags_match_reference(flags: dict) -> None:
    config = {**CONFIGS["split192-64-lanczos"], **flags}
    images = [_rgb(150, 90), _rgb(20, 20)]
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))(images)
    ref_pixels, ref_mask, rows, cols, _ = _reference(config, images)
    assert (ours.rows, ours.cols) == (rows, cols)
    assert (ours.pixel_values - ref_pixels.float()).abs().max().item() <= TOL
    assert torch.equal(ours.pixel_attention_mask, ref_mask)


def test_one_sample_with_several_images_matches() -> None:
    """The processor's usual call shape: all images of one prompt in one sample, no fake tiles."""
    config = CONFIGS["split300-128-bicubic"]
    images = [_rgb(400, 90), _rgba(60, 200), _rgb(1, 1)]
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))(images)
    ref = Idefics3ImageProcessorPil(**{k: v for k, v in config.items() if k in REF_KEYS})
    out = ref([images], return_tensors="pt", return_row_col_info=True)
    assert (ours.rows, ours.cols) == (out["rows"][0], out["cols"][0])
    assert (ours.pixel_values - out["pixel_values"][0]).abs().max().item() <= TOL
    assert torch.equal(ours.pixel_attention_mask, out["pixel_attention_mask"][0].bool())
