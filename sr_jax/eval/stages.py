"""Held-out figures of the staged learning check (issue 19, `tools/learning_check.py --stage N`).

Pure functions over answer texts and ground truth (no model), plus `greedy_answers`, the one
place the check generates. The synthetic grounding tasks are `sr_jax.data.synthetic`'s colour
and locate records.

  stage 1 (colour)   accuracy of strict-JSON answers {"colour": NAME}; the majority-class
                     baseline answers the most frequent training colour every time.
  stage 2 (locate)   parse rate of strict answers {"edit_region": [{"id", "label", "bbox_2d"}]}
                     (the SpatialReward region format, boxes 0..1000); mean IoU after Hungarian
                     matching (`match_boxes`: an unparsed answer has no boxes, IoU 0); box recall
                     at IoU 0.5. Baselines: a box of the mean training size centred in the image,
                     and the mean training box.

Also shared by the tool and `sr-jax demo`'s learn step: `heldout_spec` (the training source on
unseen seeds), `image_reliance` (the held-out answer loss with true vs blank images) and
`draw_tiles` (a contact sheet of held-out images with boxes and captions).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sr_jax.data.image import open_image
from sr_jax.data.pipeline import SYNTHETIC_PREFIX, DataPipeline
from sr_jax.data.records import BOX_GRID
from sr_jax.data.vocab import vocab_map_of
from sr_jax.eval.metrics import match_boxes
from sr_jax.special_tokens import DEFAULT_STOP_IDS


def _json_object(text: str):
    try:
        answer = json.loads(text.strip())
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def parse_colour(text: str) -> str | None:
    """The colour of a strict answer `{"colour": NAME}` (no other keys), else None."""
    answer = _json_object(text)
    if answer is None or set(answer) != {"colour"} or not isinstance(answer["colour"], str):
        return None
    return answer["colour"]


def _box(b) -> bool:
    return (isinstance(b, list) and len(b) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= BOX_GRID for v in b)
            and b[0] < b[2] and b[1] < b[3])


def answers_no_region(text: str) -> bool:
    """True for a JSON object whose `edit_region` is an empty list (other keys, such as a
    `reasoning`, allowed): the answer to a locate prompt that names an absent object."""
    answer = _json_object(text)
    return answer is not None and answer.get("edit_region") == []


def parse_regions(text: str) -> list[list[int]] | None:
    """The boxes of a strict region answer `{"edit_region": [{"id", "label", "bbox_2d"}, ...]}`
    (exactly that key, each region exactly those keys, integer boxes inside 0..1000 with
    x1 < x2 and y1 < y2), else None."""
    answer = _json_object(text)
    if answer is None or set(answer) != {"edit_region"} or not isinstance(answer["edit_region"], list):
        return None
    boxes = []
    for r in answer["edit_region"]:
        if not isinstance(r, dict) or set(r) != {"id", "label", "bbox_2d"} or not isinstance(r["label"], str) \
                or not _box(r["bbox_2d"]):
            return None
        boxes.append(list(r["bbox_2d"]))
    return boxes


def colour_metrics(predicted: Sequence[str | None], truth: Sequence[str], train_truth: Sequence[str]) -> dict:
    """Accuracy and parse rate of the answers, and the majority-class baseline's accuracy."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many answers as truths (at least one), got {len(predicted)} and {len(truth)}")
    if not train_truth:
        raise ValueError("the majority baseline needs training labels")
    majority = collections.Counter(train_truth).most_common(1)[0][0]
    return {
        "accuracy": float(np.mean([p == t for p, t in zip(predicted, truth)])),
        "parse_rate": float(np.mean([p is not None for p in predicted])),
        "majority_class": majority,
        "majority_accuracy": float(np.mean([t == majority for t in truth])),
        "examples": len(truth),
    }


def box_metrics(predicted: Sequence[list | None], truth: Sequence[list]) -> dict:
    """Parse rate, mean IoU and box recall/precision at IoU 0.5 of per-example box lists
    (None = the answer did not parse: no boxes) against the true box lists."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need as many answers as truths (at least one), got {len(predicted)} and {len(truth)}")
    matches = [match_boxes(p or [], t) for p, t in zip(predicted, truth)]
    n_true, n_pred = sum(m["n_true"] for m in matches), sum(m["n_pred"] for m in matches)
    tp = sum(m["tp"] for m in matches)
    return {
        "parse_rate": float(np.mean([p is not None for p in predicted])),
        "mean_iou": float(np.mean([m["mean_iou"] for m in matches])),
        "box_recall": tp / n_true if n_true else None,
        "box_precision": tp / n_pred if n_pred else None,
        "examples": len(truth),
    }


def box_baselines(train_boxes: Sequence[Sequence[float]], truth: Sequence[list]) -> dict[str, dict]:
    """The box metrics of two answers that ignore the image, each one box for every example:
    `centre box` (the mean training width and height, centred) and `mean train box`."""
    boxes = np.asarray(train_boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        raise ValueError("the box baselines need training boxes")
    w, h = (boxes[:, 2] - boxes[:, 0]).mean(), (boxes[:, 3] - boxes[:, 1]).mean()
    c = BOX_GRID / 2
    centre = [int(round(c - w / 2)), int(round(c - h / 2)), int(round(c + w / 2)), int(round(c + h / 2))]
    mean = [int(round(v)) for v in boxes.mean(axis=0)]
    return {name: {**box_metrics([[b]] * len(truth), truth), "box": b}
            for name, b in (("centre box", centre), ("mean train box", mean))}


def paired_gain(before: Sequence[float], after: Sequence[float], samples: int = 10000, seed: int = 0) -> dict:
    """Mean per-example gain (after - before) on the same held-out items, with a paired bootstrap
    95% interval: a gain counts only when the interval's lower end is above 0, so resampling
    noise on ~100 prompts is not read as learning."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if diff.size == 0:
        return {"mean": 0.0, "low": 0.0, "high": 0.0, "better": 0.0, "worse": 0.0}
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (samples, diff.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high),
            "better": float((diff > 0).mean()), "worse": float((diff < 0).mean())}


def greedy_answers(model, processor, records, max_new_tokens: int, batch_size: int = 8, stop_ids=None) -> list[str]:
    """Greedy answer texts (stop token and special tokens dropped) for the records' prompts."""
    from sr_jax.generation import generate
    from sr_jax.rl.rollout import _pixels, completion_mask, decode_completions, left_pad

    stop_ids = list(stop_ids or DEFAULT_STOP_IDS)
    texts = []
    for start in range(0, len(records), batch_size):
        prompts = [processor.encode(r, with_target=False) for r in records[start:start + batch_size]]
        ids, mask = left_pad(prompts)
        pixels, grids = _pixels(prompts)
        tokens = generate(model, ids, mask, pixels, grids, max_new_tokens=max_new_tokens, temperature=0.0,
                          stop_ids=stop_ids)
        texts += decode_completions(processor.tokenizer, tokens, completion_mask(tokens, stop_ids))
    return texts


def heldout_spec(spec: str, n: int, seed: int, split: str = "test") -> str:
    """The training source `spec` (synthetic:...) with its count, seed and split replaced: the same
    task mix and image sizes on examples training never sees."""
    if not spec.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"the learning check needs a synthetic training source, got {spec!r}")
    items = [i for i in spec[len(SYNTHETIC_PREFIX):].split(",") if i and i.split("=")[0].strip() not in
             ("n", "seed", "split")]
    return SYNTHETIC_PREFIX + ",".join([f"n={n}", f"seed={seed}", f"split={split}"] + items)


def image_reliance(model, data_cfg, source: str, tokenizer: str) -> dict:
    """Held-out teacher-forced loss with the true images and with every image blanked (all patches
    at the normalised value 0, a flat grey): a model that reads its images loses accuracy without
    them; one that answers from the text prior alone scores the same either way."""
    import jax

    from sr_jax.data.packing import model_inputs
    from sr_jax.train.config import LossConfig
    from sr_jax.train.step import forward_loss

    cfg = dataclasses.replace(data_cfg, sources=[source], shuffle=False, num_epochs=1, workers=0, tokenizer=tokenizer)
    loss_cfg = LossConfig(max_label_tokens=max(cfg.seq_lens) * cfg.batch_size)
    run = jax.jit(lambda b: forward_loss(model, b, loss_cfg))
    totals = {"true images": [0.0, 0.0], "blank images": [0.0, 0.0]}
    for batch in DataPipeline(cfg, vision=model.config.vision, vocab_map=vocab_map_of(model)):
        inputs = model_inputs(batch)
        blank = {**inputs, "pixel_values": np.zeros_like(inputs["pixel_values"])}
        for name, b in (("true images", inputs), ("blank images", blank)):
            stats = run(b)
            totals[name][0] += float(stats.loss_sum)
            totals[name][1] += float(stats.weight)
    return {name: s / max(w, 1.0) for name, (s, w) in totals.items()}


def draw_tiles(items, path: str | Path, scale: int = 2) -> None:
    """A contact sheet of held-out examples: `items` = (image, true boxes, predicted boxes, caption)
    with boxes on the 0..1000 grid (true green, predicted red) and the caption under each tile.
    Nothing is written for no items."""
    tiles = []
    for image, truth, predicted, caption in items:
        img = open_image(image).convert("RGB")
        w, h = img.size
        img = img.resize((w * scale, h * scale), Image.NEAREST)
        tile = Image.new("RGB", (img.width, img.height + (14 if caption else 0)), "white")
        tile.paste(img, (0, 0))
        draw = ImageDraw.Draw(tile)
        for boxes, colour in ((truth, (0, 200, 0)), (predicted, (230, 0, 0))):
            for b in boxes:
                draw.rectangle([b[0] * w * scale / BOX_GRID, b[1] * h * scale / BOX_GRID,
                                b[2] * w * scale / BOX_GRID, b[3] * h * scale / BOX_GRID], outline=colour, width=2)
        if caption:
            draw.text((2, img.height + 1), caption, fill=(0, 0, 0))
        tiles.append(tile)
    if not tiles:
        return
    width = sum(t.width for t in tiles) + 8 * (len(tiles) + 1)
    height = max(t.height for t in tiles) + 16
    sheet = Image.new("RGB", (width, height), "white")
    x = 8
    for t in tiles:
        sheet.paste(t, (x, 8))
        x += t.width + 8
    sheet.save(path)
