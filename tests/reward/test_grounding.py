"""Pixel grounding on synthetic edits whose changed region the test draws itself."""

import io

import numpy as np
import pytest
from PIL import Image

from sr_jax.reward.grounding import (
    changed_mask,
    grid_to_pixels,
    grounding_check,
    grounding_report,
    mask_bbox,
    pixels_to_grid,
)
from sr_jax.reward import aggregate, parse_output

H, W = 120, 160
SQUARE = (40, 30, 90, 70)  # pixel box x1, y1, x2, y2 (end-exclusive): 50 x 40 pixels
RED = (255, 0, 0)  # backgrounds stay in 60..200, so every square pixel differs by > 50


def background(seed, h=H, w=W):
    """A smooth random 'photo' (bicubic-upsampled 6x6 colours) with mild per-pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(66, 195, (6, 6, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-6, 7, img.shape), 60, 200).astype(np.uint8)


def draw(img, box=SQUARE, color=RED):
    out = img.copy()
    x1, y1, x2, y2 = box
    out[y1:y2, x1:x2] = color
    return out


def jpeg(img, quality):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def grid(box, h=H, w=W):
    return pixels_to_grid(box, h, w)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_is_exactly_the_drawn_square(seed):
    original = background(seed)
    mask = changed_mask(original, draw(original))
    assert mask.shape == (H, W) and mask.dtype == bool
    assert mask_bbox(mask) == SQUARE
    assert mask.sum() == 50 * 40
    # PIL images work the same as arrays.
    assert (changed_mask(Image.fromarray(original), Image.fromarray(draw(original))) == mask).all()


def test_identical_images_have_no_change():
    original = background(3)
    assert not changed_mask(original, original.copy()).any()


def test_box_grid_round_trip():
    assert grid(SQUARE) == [250, 250, 562, 583]  # 40/160, 30/120, 90/160, 70/120 of 1000, rounded
    assert grid_to_pixels(grid(SQUARE), H, W) == SQUARE
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 1001, size=2)
        x1, x2 = sorted(rng.choice(w + 1, 2, replace=False))
        y1, y2 = sorted(rng.choice(h + 1, 2, replace=False))
        assert grid_to_pixels(pixels_to_grid((x1, y1, x2, y2), h, w), h, w) == (x1, y1, x2, y2)


def test_report_for_the_exact_box():
    original = background(0)
    report = grounding_check(original, draw(original), [grid(SQUARE)])
    assert report["boxes"][0]["pixel_box"] == list(SQUARE)
    assert report["boxes"][0]["area"] == report["boxes"][0]["changed"] == 2000
    for key in ["precision_mean", "union_precision", "coverage", "iou", "grounding_score"]:
        assert report[key] == 1.0, key
    assert report["changed_fraction"] == pytest.approx(2000 / (H * W))


def test_report_for_a_shifted_box():
    mask = changed_mask(original := background(1), draw(original))
    shifted = (65, 30, 115, 70)  # same size, 25 px to the right: overlap 25 x 40 = 1000 px
    report = grounding_report(mask, [grid(shifted)])
    assert report["boxes"][0]["changed"] == 1000
    assert report["precision_mean"] == pytest.approx(1000 / 2000)
    assert report["coverage"] == pytest.approx(1000 / 2000)
    assert report["iou"] == pytest.approx(1000 / 3000)  # union = 2000 + 2000 - 1000
    assert report["grounding_score"] == pytest.approx(0.5)  # F1 of 0.5 and 0.5


def test_report_for_a_box_twice_as_large():
    mask = changed_mask(original := background(2), draw(original))
    double = (15, 10, 115, 90)  # same centre, sides doubled: 100 x 80 = 8000 px containing the square
    report = grounding_report(mask, [grid(double)])
    assert report["precision_mean"] == pytest.approx(2000 / 8000)
    assert report["coverage"] == 1.0
    assert report["iou"] == pytest.approx(2000 / 8000)
    assert report["grounding_score"] == pytest.approx(2 * 0.25 * 1.0 / 1.25)  # = 0.4


def test_report_with_no_box_and_with_two_boxes():
    mask = changed_mask(original := background(0), draw(original))
    none = grounding_report(mask, [])
    assert none["coverage"] == 0.0 and none["grounding_score"] == 0.0 and none["iou"] == 0.0
    # Right box plus a spurious one on unchanged pixels: precisions 1 and 0 -> mean 0.5, coverage 1.
    two = grounding_report(mask, [{"id": 0, "label": "x", "bbox_2d": grid(SQUARE)}, grid((120, 80, 150, 110))])
    assert two["precision_mean"] == pytest.approx(0.5) and two["coverage"] == 1.0
    assert two["union_precision"] == pytest.approx(2000 / (2000 + 900))
    assert two["grounding_score"] == pytest.approx(2 * 0.5 / 1.5)


def test_corner_cases_without_change():
    unchanged = np.zeros((H, W), dtype=bool)
    assert grounding_report(unchanged, [])["grounding_score"] == 1.0
    report = grounding_report(unchanged, [grid(SQUARE)])
    assert report["grounding_score"] == 0.0 and report["precision_mean"] == 0.0


@pytest.mark.parametrize("quality", [75, 90])
def test_jpeg_noise_is_ignored(quality):
    original = background(4)
    # Only compression, no edit: nothing may count as changed.
    assert not changed_mask(original, jpeg(original, quality)).any()
    assert not changed_mask(jpeg(original, quality), jpeg(original, 95)).any()
    # A compressed edit: the square is found, at most a pixel of chroma bleeding around it.
    mask = changed_mask(original, jpeg(draw(original), quality))
    x1, y1, x2, y2 = mask_bbox(mask)
    assert abs(x1 - 40) <= 1 and abs(y1 - 30) <= 1 and abs(x2 - 90) <= 1 and abs(y2 - 70) <= 1
    assert grounding_report(mask, [grid(SQUARE)])["grounding_score"] > 0.95


def test_threshold_and_cleanup_matter():
    """Without threshold or cleanup, the same JPEG noise does show up: the defaults are doing work."""
    original = background(4)
    noisy = jpeg(original, 75)
    assert changed_mask(original, noisy, threshold=0, open_radius=0).mean() > 0.5
    # A lone changed pixel is noise to the default opening, but kept without it.
    speck = original.copy()
    speck[60, 80] = 255 - speck[60, 80]
    assert not changed_mask(original, speck).any()
    assert changed_mask(original, speck, open_radius=0).sum() == 1


def test_original_of_another_size():
    """The original is resized to the edited image's grid; resampling blur stays under threshold."""
    big = background(5, 240, 320)
    original = np.asarray(Image.fromarray(big).resize((200, 150), Image.Resampling.BILINEAR))
    edited = draw(np.asarray(Image.fromarray(big).resize((W, H), Image.Resampling.BILINEAR)))
    mask = changed_mask(original, edited)
    assert mask.shape == (H, W)
    x1, y1, x2, y2 = mask_bbox(mask)
    assert abs(x1 - 40) <= 1 and abs(y1 - 30) <= 1 and abs(x2 - 90) <= 1 and abs(y2 - 70) <= 1
    # max_side shrinks both images: a half-size mask, same box on the 0..1000 grid.
    small = changed_mask(original, edited, max_side=80)
    assert small.shape == (60, 80)
    assert grounding_report(small, [grid(SQUARE)])["grounding_score"] > 0.9


def test_inputs_of_other_layouts():
    original = background(6)
    edited = draw(original)
    rgba = np.concatenate([edited, np.full((H, W, 1), 255, np.uint8)], axis=2)
    assert mask_bbox(changed_mask(original, rgba)) == SQUARE
    gray_before, gray_after = original[..., 1], edited[..., 1]
    assert mask_bbox(changed_mask(gray_before, gray_after)) == SQUARE
    with pytest.raises(ValueError, match="edited: expected a uint8"):
        changed_mask(original, edited.astype(np.float32))
    with pytest.raises(TypeError, match="original"):
        changed_mask([[1]], edited)


def test_bad_boxes_name_the_box():
    mask = np.zeros((H, W), dtype=bool)
    with pytest.raises(ValueError, match="box 1"):
        grounding_report(mask, [[0, 0, 10, 10], [50, 50, 40, 60]])
    with pytest.raises(ValueError, match="box 0"):
        grounding_report(mask, [[0, 0, 10]])


def test_parsed_answer_feeds_grounding_and_reward():
    original = background(7)
    edited = draw(original)
    box = grid(SQUARE)
    answer = parse_output('{"edit_region": [{"id": 0, "label": "red square", "bbox_2d": %s}], '
                          '"reasoning": "<|bbox_0|> added", "score": [25, 25]}' % box)
    g = grounding_check(original, edited, answer["edit_region"])["grounding_score"]
    assert g == 1.0
    # SC = PQ = 10 -> base reward 1.0; a perfect grounding keeps it at 1.0.
    assert aggregate(answer["score"], [25, 25], grounding=g, grounding_weight=0.5)[0] == pytest.approx(1.0)
    missed = grounding_check(original, edited, [grid((120, 80, 150, 110))])["grounding_score"]
    # 0.5 * 1.0 + 0.5 * 0 = 0.5
    assert aggregate(answer["score"], [25, 25], grounding=missed, grounding_weight=0.5)[0] == pytest.approx(0.5)
