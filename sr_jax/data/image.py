"""Qwen3-VL image preprocessing: decode -> RGB -> resize to a 32-multiple grid -> patches.

Matches HF's PIL image processor for Qwen2/3-VL step by step:
- transparency (an alpha band or a `transparency` entry) is composited onto white, every
  other mode goes through PIL's own `convert("RGB")`;
- resizing is PIL bicubic on the uint8 RGB image;
- values are x * (1/255) in float64, cast to float32, then (x - mean) / std in float32. Every
  step is per-pixel, so a 256-entry lookup table gives the identical float32 bits;
- patches are ordered by 2x2 merge window (row-major over windows, then row-major inside a
  window), each flattened as (channel, time, patch_row, patch_col) with the single frame
  repeated over the 2 time steps.

`ImageConfig.pre_resize` adds LLaMA-Factory's own PIL step in front (its multimodal plugin for
Qwen2/3-VL, as the official SFT run trained): the image is first scaled to at most `max` and at
least `min` pixels (each side truncated to an int, PIL's default filter for the image's mode,
before any RGB conversion), converted with PIL's plain `convert("RGB")` (alpha dropped, not
composited), given sides of at least 28 px and an aspect ratio of at most 200 (wider is squeezed
to 180); THEN the processor step above runs with its own min/max pixels on that RGB image.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from sr_jax.models import get_family

_PATCHES = get_family().image  # the default family's patch geometry

MAX_ASPECT_RATIO = 200
# Pixel budgets (height * width after the resize), each default defined here once:
MIN_PIXELS = 3136  # 56 * 56, HF's Qwen2-VL processor default; our floor in every stage
MAX_PIXELS = 262144  # 512 * 512, the official SFT budget: data pipeline and Processor default
EVAL_MAX_PIXELS = 589824  # SpatialReward's evaluation budget: the scorer's (and server's) default
RL_MAX_PIXELS = 401408  # SpatialReward's RL budget (MAX_PIXELS): GRPO prompts' default
# LLaMA-Factory's step: the official SFT yaml's image_max_pixels and LLaMA-Factory's default
# image_min_pixels; then Qwen3-VL checkpoints' own processor size (preprocessor_config.json
# size.shortest_edge / size.longest_edge), which is what its HF processor applies after it.
LLAMAFACTORY_MAX_PIXELS = MAX_PIXELS
LLAMAFACTORY_MIN_PIXELS = 32 * 32
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216
LLAMAFACTORY_MIN_SIDE = 28
LLAMAFACTORY_SQUEEZED_RATIO = 180


class ImageError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    patch_size: int = _PATCHES.patch_size
    temporal_patch_size: int = _PATCHES.temporal_patch_size
    merge_size: int = _PATCHES.merge_size
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pre_resize: tuple[int, int] | None = None  # (max_pixels, min_pixels) of LLaMA-Factory's step

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, close to the input aspect ratio, area in budget."""
    if min(height, width) <= 0:
        raise ImageError(f"image has an empty side: {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(f"aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO} ({width}x{height})")
    # Python's round() (half to even) is what the reference uses; keep it.
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def open_image(source: bytes | str | Path | Image.Image) -> Image.Image:
    """Decodes bytes or a file path fully (so truncated files fail here, not later)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, (str, Path)):
        img = Image.open(source)
    else:
        raise ImageError(f"expected image bytes or a path, got {type(source).__name__}")
    img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way the reference does it: transparent pixels become white, others use PIL."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


@functools.cache
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, one contiguous row per channel."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
    table = (levels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(table.T)


def _resize_to(img: Image.Image, width: int, height: int) -> Image.Image:
    if width <= 0 or height <= 0:
        raise ImageError(f"image {img.width}x{img.height} would be resized to an empty {width}x{height}")
    # No filter named: LLaMA-Factory takes PIL's default (bicubic; nearest for modes 1 and P).
    return img.resize((width, height))


def llamafactory_regularize(img: Image.Image, max_pixels: int, min_pixels: int) -> Image.Image:
    """LLaMA-Factory's PIL step for Qwen2/3-VL images -> an RGB image (see the module docstring)."""
    if img.width * img.height > max_pixels:
        scale = math.sqrt(max_pixels / (img.width * img.height))
        img = _resize_to(img, int(img.width * scale), int(img.height * scale))
    if img.width * img.height < min_pixels:
        scale = math.sqrt(min_pixels / (img.width * img.height))
        img = _resize_to(img, int(img.width * scale), int(img.height * scale))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if min(img.width, img.height) < LLAMAFACTORY_MIN_SIDE:
        img = _resize_to(img, max(img.width, LLAMAFACTORY_MIN_SIDE), max(img.height, LLAMAFACTORY_MIN_SIDE))
    if img.width / img.height > MAX_ASPECT_RATIO:
        img = _resize_to(img, img.height * LLAMAFACTORY_SQUEEZED_RATIO, img.height)
    if img.height / img.width > MAX_ASPECT_RATIO:
        img = _resize_to(img, img.width, img.width * LLAMAFACTORY_SQUEEZED_RATIO)
    return img


def resize_rgb(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """RGB image -> uint8 (H, W, 3) at the smart-resized size."""
    width, height = img.size
    new_h, new_w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def normalise(pixels: np.ndarray, cfg: ImageConfig) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3) through the per-channel lookup table."""
    table = _normalise_table(cfg.image_mean, cfg.image_std)
    if (table == table[:1]).all():  # same mean/std for every channel: one gather
        return np.take(table[0], pixels, mode="clip")
    out = np.empty(pixels.shape, np.float32)
    for c in range(pixels.shape[-1]):
        out[..., c] = np.take(table[c], pixels[..., c], mode="clip")
    return out


def patchify(pixels: np.ndarray, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 (H, W, 3) -> float32 (grid_h*grid_w, patch_dim) and grid (1, grid_h, grid_w)."""
    height, width, channels = pixels.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ImageError(f"image {width}x{height} is not a multiple of {p * m}")
    gh, gw = height // p, width // p
    # (win_row, merge_row, patch_row, win_col, merge_col, patch_col, channel) ->
    # (win_row, win_col, merge_row, merge_col, channel, patch_row, patch_col)
    blocks = normalise(pixels, cfg).reshape(gh // m, m, p, gw // m, m, p, channels).transpose(0, 3, 1, 4, 6, 2, 5)
    out = np.empty((gh // m, gw // m, m, m, channels, t, p, p), np.float32)
    out[..., 0, :, :] = blocks  # the one strided copy; the other time steps repeat it
    for step in range(1, t):
        out[..., step, :, :] = out[..., 0, :, :]
    return out.reshape(gh * gw, channels * t * p * p), (1, gh, gw)


def preprocess_image(source, cfg: ImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """bytes / path / PIL image -> (patches float32 (N, patch_dim), grid_thw)."""
    img = open_image(source)
    if cfg.pre_resize is not None:
        img = llamafactory_regularize(img, *cfg.pre_resize)
    # Then the processor's own RGB step: on the pre-resized image it still composites an RGB
    # image's `transparency` colour (a converted palette image keeps one) onto white, as HF does.
    img = to_rgb(img)
    return patchify(resize_rgb(img, cfg), cfg)


def preprocess_images(sources, cfg: ImageConfig) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> concatenated patches (sum N, patch_dim) and grids (n, 3) int64."""
    if not sources:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    results = [preprocess_image(s, cfg) for s in sources]
    patches = np.concatenate([r[0] for r in results], axis=0)
    grids = np.asarray([r[1] for r in results], dtype=np.int64)
    return patches, grids
