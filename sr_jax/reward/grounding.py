"""Pixel grounding: do the boxes the reward model drew cover the pixels the edit actually changed?

`changed_mask(original, edited)` finds the changed pixels; `grounding_report(mask, boxes)` compares
them with predicted boxes (0..1000 grid of the edited image, as in the model's `bbox_2d`).
This needs no model: it checks an answer against ground truth the images themselves provide, so it
can be folded into the reward (`sr_jax.reward.aggregate(..., grounding=...)`) or used in evaluation.
When an SC prompt has several originals, the caller picks the one the edit was made from.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from sr_jax.reward.parse import BOX_GRID
# Max-channel difference (0..255) above which a pixel counts as changed. JPEG (quality 75-95) and
# bilinear resampling of smooth content stay below ~20; real edits are far larger.
DEFAULT_THRESHOLD = 32
# A 3x3 opening (radius 1) removes isolated specks of noise that pass the threshold while keeping
# every changed area at least 3 pixels wide exactly as it is.
DEFAULT_OPEN_RADIUS = 1
RESAMPLING = Image.Resampling.BILINEAR


def to_rgb_array(image: Any, name: str = "image") -> np.ndarray:
    """A PIL image or uint8 array (HxW, HxWx1, HxWx3, HxWx4: alpha dropped) as HxWx3 uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image or a uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected a uint8 array, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape[:2]:
        raise ValueError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {image.shape}")
    return np.broadcast_to(image[..., :3], image.shape[:2] + (3,))


def _resized(rgb: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == size_hw:
        return rgb
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size_hw[::-1], RESAMPLING))


def _window(mask: np.ndarray, radius: int, reduce) -> np.ndarray:
    """Square-window AND/OR (erosion/dilation) done separably; edges are replicated so that
    the image border does not count as unchanged (or changed) background."""
    out = mask
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = padded.take(range(0, n), axis=axis)
        for d in range(1, 2 * radius + 1):
            acc = reduce(acc, padded.take(range(d, d + n), axis=axis))
        out = acc
    return out


def changed_mask(
    original: Any,
    edited: Any,
    threshold: int = DEFAULT_THRESHOLD,
    open_radius: int = DEFAULT_OPEN_RADIUS,
    max_side: int | None = None,
) -> np.ndarray:
    """Boolean HxW mask of the pixels the edit changed, on the edited image's grid.

    The comparison size is the edited image's size, shrunk (aspect kept) so that its longer side
    is at most `max_side` when given. Both images are brought to that size with the same filter
    (`RESAMPLING`, bilinear; an image already at that size is left untouched), so with equal
    sizes and no max_side the comparison is pixel-exact. A pixel is changed when the largest
    absolute difference over its R, G, B values exceeds `threshold`; a morphological opening with
    a (2*open_radius+1)^2 square then removes specks (open_radius=0 disables it).
    """
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must lie in [0, 255), got {threshold}")
    if open_radius < 0:
        raise ValueError(f"open_radius must be >= 0, got {open_radius}")
    before = to_rgb_array(original, "original")
    after = to_rgb_array(edited, "edited")
    h, w = after.shape[:2]
    if max_side is not None:
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        scale = min(1.0, max_side / max(h, w))
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
    before, after = _resized(before, (h, w)), _resized(after, (h, w))
    diff = np.abs(before.astype(np.int16) - after.astype(np.int16)).max(axis=2)
    mask = diff > threshold
    if open_radius:
        mask = _window(_window(mask, open_radius, np.logical_and), open_radius, np.logical_or)
    return mask


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel box (x1, y1, x2, y2) of the True pixels, end-exclusive; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pixels_to_grid(box: Sequence[int], height: int, width: int) -> list[int]:
    """End-exclusive pixel box -> integer 0..1000 box (pixel edges scaled, then rounded)."""
    x1, y1, x2, y2 = box
    return [round(x1 * BOX_GRID / width), round(y1 * BOX_GRID / height),
            round(x2 * BOX_GRID / width), round(y2 * BOX_GRID / height)]


def grid_to_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    """0..1000 box -> end-exclusive pixel box, at least one pixel wide and tall.
    Inverse of `pixels_to_grid` whenever the image has at most 1000 pixels per side."""
    def edge(v: float, size: int) -> int:
        return int(np.clip(round(v * size / BOX_GRID), 0, size))

    x1, x2 = edge(box[0], width), edge(box[2], width)
    y1, y2 = edge(box[1], height), edge(box[3], height)
    x1, y1 = min(x1, width - 1), min(y1, height - 1)
    return x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)


def _grid_boxes(boxes: Sequence[Any]) -> list[list[float]]:
    """Accepts [x1, y1, x2, y2] lists or region dicts with "bbox_2d" (parse_output's edit_region)."""
    out = []
    for i, item in enumerate(boxes):
        box = item.get("bbox_2d") if isinstance(item, dict) else item
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"box {i}: expected 4 numbers, got {box!r}") from exc
        if len(values) != 4 or not np.isfinite(values).all():
            raise ValueError(f"box {i}: expected 4 finite numbers, got {box!r}")
        if not (0 <= values[0] < values[2] <= BOX_GRID and 0 <= values[1] < values[3] <= BOX_GRID):
            raise ValueError(f"box {i}: {box!r} needs 0 <= x1 < x2 <= {BOX_GRID} and 0 <= y1 < y2 <= {BOX_GRID}")
        out.append(values)
    return out


def _ratio(num: int, den: int, if_empty: float) -> float:
    return num / den if den else if_empty


def grounding_report(mask: np.ndarray, boxes: Sequence[Any]) -> dict:
    """Compares a changed-pixel mask with predicted boxes (0..1000 grid).

    Returns
      boxes:          per box {"bbox_2d", "pixel_box", "area", "changed", "precision"}, where
                      precision = changed pixels inside the box / box area;
      precision_mean: mean of the per-box precisions (1.0 without boxes: nothing claimed wrongly);
      union_precision: changed pixels inside the union of boxes / union area;
      coverage:       changed pixels inside the union / all changed pixels (recall; 1.0 when
                      nothing changed: nothing to miss);
      iou:            union of boxes vs changed mask (1.0 when both are empty);
      changed_fraction: changed pixels / image pixels;
      grounding_score: F1 of precision_mean and coverage, in [0, 1] (0 when both are 0).
    The vacuous values make the corner cases come out as they should: no boxes and no change
    -> 1; no boxes but a change -> 0 (coverage 0); boxes but no change -> 0 (precision 0).
    Mean per-box precision (not union precision) is used so that a spurious small box costs as
    much as a spurious large one.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"mask: expected a non-empty HxW array, got shape {mask.shape}")
    h, w = mask.shape
    union = np.zeros_like(mask)
    per_box = []
    for box in _grid_boxes(boxes):
        x1, y1, x2, y2 = grid_to_pixels(box, h, w)
        area = (x2 - x1) * (y2 - y1)
        changed = int(mask[y1:y2, x1:x2].sum())
        union[y1:y2, x1:x2] = True
        per_box.append({"bbox_2d": box, "pixel_box": [x1, y1, x2, y2], "area": area,
                        "changed": changed, "precision": changed / area})
    n_changed, n_union = int(mask.sum()), int(union.sum())
    hit = int((mask & union).sum())
    precision = float(np.mean([b["precision"] for b in per_box])) if per_box else 1.0
    coverage = _ratio(hit, n_changed, 1.0)
    score = 2 * precision * coverage / (precision + coverage) if precision + coverage > 0 else 0.0
    return {
        "boxes": per_box,
        "precision_mean": precision,
        "union_precision": _ratio(hit, n_union, 1.0),
        "coverage": coverage,
        "iou": _ratio(hit, int((mask | union).sum()), 1.0),
        "changed_fraction": n_changed / mask.size,
        "grounding_score": score,
    }


def grounding_check(original: Any, edited: Any, boxes: Sequence[Any], **mask_options: Any) -> dict:
    """`grounding_report(changed_mask(original, edited, **mask_options), boxes)`."""
    return grounding_report(changed_mask(original, edited, **mask_options), boxes)
