"""Fast checks of idefix.processing.image that need no reference: limits, config parsing, errors."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from idefix.errors import ImageError, ModelLoadError
from idefix.processing.image import (
    MAX_IMAGE_PIXELS,
    ImageProcessor,
    ImageProcessorConfig,
    encoder_size,
    longest_edge_size,
)

SMOLVLM_PREPROCESSOR = {  # HuggingFaceTB/SmolVLM-256M-Instruct preprocessor_config.json, as shipped
    "do_convert_rgb": True,
    "do_image_splitting": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "max_image_size": {"longest_edge": 512},
    "processor_class": "Idefics3Processor",
    "resample": 1,
    "rescale_factor": 0.00392156862745098,
    "size": {"longest_edge": 2048},
}
SMALL = ImageProcessorConfig(longest_edge=96, max_image_size=32)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no pixel data: decoding it would fail."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def test_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # Let Pillow open 20000x20000 (its own guard would refuse it at open) to test ours on the lazy image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = Image.open(io.BytesIO(_png_header(20_000, 20_000)))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"20000x20000 = 400,000,000 pixels.*40,000,000"):
        ImageProcessor(SMALL)([image])
    assert time.perf_counter() - start < 0.5
    assert image._im is None  # never decoded (Pillow allocates `_im` on load)


def test_just_over_default_limit_refused_under_pillow_limit() -> None:
    image = Image.open(io.BytesIO(_png_header(8000, 5001)))  # 40,008,000 pixels: Pillow itself accepts it
    with pytest.raises(ImageError, match="above the limit"):
        ImageProcessor(SMALL)([Image.new("RGB", (4, 4)), image])


def test_custom_limit_and_empty_image() -> None:
    with pytest.raises(ImageError, match="limit of 15"):
        ImageProcessor(SMALL, max_pixels=15)([Image.new("RGB", (4, 4))])
    with pytest.raises(ImageError, match="empty"):
        ImageProcessor(SMALL)([Image.new("RGB", (0, 3))])
    assert MAX_IMAGE_PIXELS == 40_000_000


def test_truncated_image_is_image_error() -> None:
    with pytest.raises(ImageError, match="cannot decode"):
        ImageProcessor(SMALL)([Image.open(io.BytesIO(_png_header(40, 30)))])


def test_non_rgb_without_conversion_is_image_error() -> None:
    processor = ImageProcessor(ImageProcessorConfig(do_convert_rgb=False, longest_edge=64, max_image_size=32))
    with pytest.raises(ImageError, match="mode RGBA"):
        processor([Image.new("RGBA", (10, 10))])


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (3000, 20), (33, 32)])
def test_shapes_and_mask(size: tuple[int, int]) -> None:
    batch = ImageProcessor(SMALL)([Image.new("RGB", size, (255, 0, 0)), Image.new("L", (32, 32))])
    t = sum(batch.tiles_per_image)
    assert batch.pixel_values.shape == (t, 3, 32, 32) and batch.pixel_values.dtype == torch.float32
    assert batch.pixel_attention_mask.shape == (t, 32, 32) and bool(batch.pixel_attention_mask.all())
    assert batch.tiles_per_image[0] == (batch.rows[0] * batch.cols[0] + 1 if batch.rows[0] else 1)
    assert batch.tiles_per_image[1] == 3 * 3 + 1  # 32x32 is first resized up to 96x96
    assert torch.equal(batch.pixel_values[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red, normalised


def test_empty_call() -> None:
    batch = ImageProcessor(SMALL)([])
    assert batch.pixel_values.shape == (0, 3, 32, 32) and batch.tiles_per_image == []


def test_size_arithmetic() -> None:
    assert longest_edge_size(1, 1, 192) == (192, 192)
    assert longest_edge_size(5000, 1, 192) == (192, 1)  # int(0.03) = 0, clamped to 1
    assert longest_edge_size(20, 3000, 192) == (2, 192)  # int(1.28) = 1, rounded up to even
    assert longest_edge_size(10, 20000, 20000) == (2, 4096)  # capped: int(4096 / 2000)
    assert encoder_size(2, 192, 64) == (64, 192)
    assert encoder_size(300, 200, 128) == (384, 256)


def test_config_defaults_are_the_reference_defaults() -> None:
    config = ImageProcessorConfig.from_dict({"unknown_key": 1, "processor_class": "X"})
    assert config == ImageProcessorConfig()
    assert (config.longest_edge, config.max_image_size, config.resample) == (1456, 364, 1)
    assert config.rescale_factor == 1 / 255 and config.image_mean == (0.5, 0.5, 0.5)
    assert config.do_convert_rgb and config.do_resize and config.do_image_splitting and config.do_pad


def test_config_from_hub_dict() -> None:
    config = ImageProcessorConfig.from_dict({**SMOLVLM_PREPROCESSOR, "image_std": 0.25, "do_pad": False})
    assert (config.longest_edge, config.max_image_size) == (2048, 512)
    assert config.image_std == (0.25, 0.25, 0.25) and not config.do_pad


@pytest.mark.parametrize(
    "bad", [{"size": {"height": 10, "width": 10}}, {"resample": 9}, {"image_mean": [0.5, 0.5]}, {"size": 5}]
)
def test_bad_config_is_model_load_error(bad: dict) -> None:
    with pytest.raises(ModelLoadError):
        ImageProcessorConfig.from_dict(bad)


def test_from_dir_reads_preprocessor_config(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMOLVLM_PREPROCESSOR))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 64}))  # hub: no nesting
    assert ImageProcessor.from_dir(tmp_path).config.max_image_size == 512


def test_from_dir_prefers_nested_processor_config(tmp_path: Path) -> None:
    # transformers 5 save_pretrained writes only processor_config.json with an "image_processor" entry;
    # when both exist transformers takes the nested one first, and so do we.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SMOLVLM_PREPROCESSOR))
    nested = {"image_processor": {"size": {"longest_edge": 192}, "max_image_size": {"longest_edge": 64}}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert ImageProcessor.from_dir(str(tmp_path)).config.max_image_size == 64


def test_from_dir_missing_or_broken(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*preprocessor_config.json"):
        ImageProcessor.from_dir(tmp_path)


def test_runtime_does_not_import_transformers() -> None:
    code = "import sys, idefix.processing.image; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
