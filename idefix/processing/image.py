"""Idefics3 / SmolVLM image preprocessing: RGB, resize, tiles, rescale, normalise, pad.

Numerically identical to transformers' `Idefics3ImageProcessorPil` (the oracle in
tests/parity/test_image_processing.py). Per image, everything up to the tiles stays a uint8 RGB
Pillow image, so every resize is Pillow's own, exactly as the reference (which round-trips uint8
numpy <-> PIL losslessly between its steps):

  1. RGB: any transparency is composited onto white; other modes go through `Image.convert("RGB")`.
  2. Resize so the longest edge is `longest_edge` (up or down), the other edge int-truncated then
     rounded up to even, both capped at 4096.
  3. Resize up to multiples of the tile side m = `max_image_size` (short edge derived from the long one).
  4. If larger than one tile: rows x cols m x m crops, row-major, then the whole image resized to m x m
     (the "global" tile, last). Without splitting: the image is squashed to m x m.
Then on tensors: x * rescale_factor in float64 -> float32, (x - mean) / std in float32, zero padding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from idefix.errors import ImageError, ModelLoadError

MAX_IMAGE_PIXELS = 40_000_000  # refuse larger images before decoding (decompression bombs)
_MAX_SIDE = 4096  # the reference's absolute cap after the longest-edge resize
_PIL_FILTERS = range(6)  # NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image half of a preprocessor_config.json; defaults are `Idefics3ImageProcessorPil`'s."""

    do_convert_rgb: bool = True
    do_resize: bool = True
    longest_edge: int = 4 * 364  # size.longest_edge: first resize target of the long edge
    resample: int = 1  # PIL filter id; 1 = LANCZOS
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_pad: bool = True  # tiles are always padded to a common size here; see ImageProcessor.__call__
    do_image_splitting: bool = True
    max_image_size: int = 364  # max_image_size.longest_edge: the tile side m

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Build from the json dict as the hub ships it; unknown keys are ignored."""
        try:
            kw: dict[str, Any] = {}
            for key in ("do_convert_rgb", "do_resize", "do_rescale", "do_normalize", "do_pad"):
                if d.get(key) is not None:
                    kw[key] = bool(d[key])
            if d.get("do_image_splitting") is not None:
                kw["do_image_splitting"] = bool(d["do_image_splitting"])
            if d.get("size") is not None:
                kw["longest_edge"] = _edge(d["size"], "size")
            if d.get("max_image_size") is not None:
                kw["max_image_size"] = _edge(d["max_image_size"], "max_image_size")
            if d.get("resample") is not None:
                kw["resample"] = int(d["resample"])
                if kw["resample"] not in _PIL_FILTERS:
                    raise ValueError(f"resample={d['resample']} is not a Pillow filter id (0-5)")
            if d.get("rescale_factor") is not None:
                kw["rescale_factor"] = float(d["rescale_factor"])
            for key in ("image_mean", "image_std"):
                if d.get(key) is not None:
                    kw[key] = _triple(d[key], key)
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"invalid image processor config: {e}") from e
        return cls(**kw)


def _edge(value: Any, name: str) -> int:
    # Only {"longest_edge": N} exists for Idefics3 checkpoints; fixed {"height", "width"} is not supported.
    if not isinstance(value, dict) or not isinstance(value.get("longest_edge"), int) or value["longest_edge"] < 1:
        raise ValueError(f"{name} must be {{'longest_edge': positive int}}, got {value!r}")
    return int(value["longest_edge"])


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    vals = [float(value)] * 3 if isinstance(value, int | float) else [float(v) for v in value]
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values, got {value!r}")
    return vals[0], vals[1], vals[2]


@dataclass(frozen=True)
class ImageBatch:
    """All tiles of all images of one request, in prompt order."""

    pixel_values: torch.Tensor  # [T, 3, H, W] float32, T = sum(tiles_per_image), zero-padded to common H, W
    pixel_attention_mask: torch.Tensor  # [T, H, W] bool, True on real pixels
    rows: list[int]  # per image: tile rows (0 when not split)
    cols: list[int]  # per image: tile cols (0 when not split)
    tiles_per_image: list[int]  # per image: rows * cols + 1 (tiles, then the global image), or 1


def check_image_size(image: Image.Image, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Refuse empty or oversized images; reads only the header-derived size, never the pixels."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"image is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,}; "
            "send a smaller image"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference makes it: alpha (band "A" or palette/tRNS transparency) flattened on white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    # Note: I;16 / I / F are clipped to 0..255 by Pillow, not rescaled; the reference does the same.
    return image.convert("RGB")


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after step 2; float and int() truncation exactly as the reference."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Second pass: scale below the absolute cap, aspect from the sizes just computed.
    aspect = width / height
    if width >= height and width > _MAX_SIDE:
        width, height = _MAX_SIDE, int(_MAX_SIDE / aspect)
    elif height > width and height > _MAX_SIDE:
        height, width = _MAX_SIDE, int(_MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) after step 3: both multiples of `tile`, the short one derived from the long one."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


class ImageProcessor:
    """PIL images -> ImageBatch. Stateless apart from its config; safe to share between threads."""

    def __init__(self, config: ImageProcessorConfig, *, max_pixels: int = MAX_IMAGE_PIXELS):
        self.config = config
        self.max_pixels = max_pixels

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageProcessor:
        """Read the config as transformers does: processor_config.json["image_processor"] (what
        transformers 5 `save_pretrained` writes) first, else preprocessor_config.json (hub checkpoints)."""
        model_dir = Path(model_dir)
        nested = _read_json(model_dir / "processor_config.json")
        if nested is not None and isinstance(nested.get("image_processor"), dict):
            return cls(ImageProcessorConfig.from_dict(nested["image_processor"]), max_pixels=max_pixels)
        flat = _read_json(model_dir / "preprocessor_config.json")
        if flat is None:
            raise ModelLoadError(
                f"{model_dir / 'preprocessor_config.json'} not found (nor an 'image_processor' entry in "
                "processor_config.json); the model folder needs its image processor config"
            )
        return cls(ImageProcessorConfig.from_dict(flat), max_pixels=max_pixels)

    def __call__(self, images: Sequence[Image.Image]) -> ImageBatch:
        """Every image is size-checked before any is decoded, so one bomb costs no decoding at all.

        Unlike the reference, tiles are padded to a common size even when do_pad is false (it could
        not stack them otherwise); in practice every tile is already m x m, so padding is a no-op.
        """
        for image in images:
            check_image_size(image, self.max_pixels)
        per_image = [self._tiles(image) for image in images]
        values, mask = _pad([self._normalise(t) for t, _, _ in per_image], self.config.max_image_size)
        return ImageBatch(
            pixel_values=values,
            pixel_attention_mask=mask,
            rows=[r for _, r, _ in per_image],
            cols=[c for _, _, c in per_image],
            tiles_per_image=[t.shape[0] for t, _, _ in per_image],
        )

    def _tiles(self, image: Image.Image) -> tuple[torch.Tensor, int, int]:
        """One image -> (uint8 tiles [n, 3, h, w], rows, cols)."""
        cfg, m = self.config, self.config.max_image_size
        image = self._decode(image)
        if cfg.do_resize:
            image = self._resize(image, *longest_edge_size(image.height, image.width, cfg.longest_edge))
        if not cfg.do_image_splitting:
            return _to_tensor(self._resize(image, m, m))[None], 0, 0
        image = self._resize(image, *encoder_size(image.height, image.width, m))
        if image.height <= m and image.width <= m:
            return _to_tensor(image)[None], 0, 0
        rows, cols = image.height // m, image.width // m  # exact: both sides are multiples of m
        # [3, rows*m, cols*m] -> [3, rows, m, cols, m] -> [rows, cols, 3, m, m]: row-major tiles
        grid = _to_tensor(image).view(3, rows, m, cols, m).permute(1, 3, 0, 2, 4).reshape(-1, 3, m, m)
        global_tile = _to_tensor(self._resize(image, m, m))[None]
        return torch.cat([grid, global_tile]), rows, cols

    def _decode(self, image: Image.Image) -> Image.Image:
        try:
            if self.config.do_convert_rgb:
                return to_rgb(image)
            image.load()
        except (OSError, ValueError, EOFError) as e:
            raise ImageError(f"cannot decode image: {e}") from e
        if image.mode != "RGB":
            # The reference fails later (3-channel mean/std on another channel count); say why here.
            raise ImageError(f"image mode {image.mode} is not RGB and do_convert_rgb is false")
        return image

    def _resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        # Pillow returns a copy when the size is unchanged, as in the reference.
        return image.resize((width, height), resample=self.config.resample)

    def _normalise(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] -> float32 [n, 3, h, w], operation by operation as the reference's numpy."""
        cfg = self.config
        if cfg.do_rescale:
            # float64 multiply, then float32: the reference's rounding (not a float32 multiply).
            x = (tiles.to(torch.float64) * cfg.rescale_factor).to(torch.float32)
        else:
            x = tiles.to(torch.float32)
        if cfg.do_normalize:
            mean = torch.tensor(cfg.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(cfg.image_std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _pad(tiles: list[torch.Tensor], tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image [n_i, 3, h_i, w_i] -> ([T, 3, H, W] zero-padded bottom/right, [T, H, W] bool mask)."""
    if not tiles:
        return torch.zeros(0, 3, tile, tile), torch.zeros(0, tile, tile, dtype=torch.bool)
    height = max(t.shape[-2] for t in tiles)
    width = max(t.shape[-1] for t in tiles)
    total = sum(t.shape[0] for t in tiles)
    values = torch.zeros(total, 3, height, width, dtype=torch.float32)
    mask = torch.zeros(total, height, width, dtype=torch.bool)
    start = 0
    for t in tiles:
        n, _, h, w = t.shape
        values[start : start + n, :, :h, :w] = t
        mask[start : start + n, :h, :w] = True
        start += n
    return values, mask


def _read_json(path: Path) -> dict[str, Any] | None:
    """The parsed object, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data
