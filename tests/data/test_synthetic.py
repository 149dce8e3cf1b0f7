"""The synthetic edit data: determinism, splits, and ground truth recomputed from the pixels."""

import dataclasses
import hashlib
import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from sr_jax.data import synth_render as R
from sr_jax.data.pipeline import SyntheticSource
from sr_jax.data.records import SpatialExample
from sr_jax.data.synthetic import (
    EDIT_TYPES,
    SynthConfig,
    generate_example,
    generate_examples,
    overediting_score,
    pq_scores,
    success_score,
)

TOL = 12  # the documented changed-pixel threshold, restated so a silent change is caught


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def diff_mask(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (np.abs(a.astype(np.int32) - b.astype(np.int32)) > TOL).any(axis=-1)


def bbox(mask: np.ndarray):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def to_grid(box, w, h):
    import math

    x0, y0, x1, y1 = box
    return (math.floor(1000 * x0 / w), math.floor(1000 * y0 / h), math.ceil(1000 * x1 / w), math.ceil(1000 * y1 / h))


@pytest.fixture(scope="module")
def sample() -> list[SpatialExample]:
    return list(generate_examples(240, seed=11, image_size=(64, 160)))


def test_deterministic_by_seed_and_index():
    a = list(generate_examples(12, seed=5, image_size=(64, 128)))
    b = list(generate_examples(12, seed=5, image_size=(64, 128)))
    assert [e.images for e in a] == [e.images for e in b]
    assert [e.target_json() for e in a] == [e.target_json() for e in b]
    assert [e.meta for e in a] == [e.meta for e in b]
    # Any example can be produced on its own (sharded generation).
    tail = list(generate_examples(4, seed=5, image_size=(64, 128), start=8))
    assert [e.images for e in tail] == [e.images for e in a[8:]]
    assert [e.id for e in tail] == [f"synth-train-{i:06d}" for i in range(8, 12)]
    other = list(generate_examples(12, seed=6, image_size=(64, 128)))
    assert sum(x.images == y.images for x, y in zip(a, other)) == 0


def test_splits_use_disjoint_streams():
    digests = {}
    for split in ("train", "validation", "test"):
        exs = list(generate_examples(40, seed=3, split=split, image_size=(64, 96)))
        assert all(e.id.startswith(f"synth-{split}-") and e.meta["split"] == split for e in exs)
        digests[split] = {hashlib.sha256(b).hexdigest() for e in exs for b in e.images}
    assert not digests["train"] & digests["validation"]
    assert not digests["train"] & digests["test"]
    assert not digests["validation"] & digests["test"]


def test_every_example_is_valid_and_covers_all_kinds(sample):
    seen_edits, seen_outcomes, tasks = set(), set(), set()
    for e in sample:
        e.validate()
        tasks.add(e.task)
        sizes = [decode(b).shape[1::-1] for b in e.images]
        assert [list(s) for s in sizes] == e.meta["image_sizes"]
        assert all(64 <= s <= 160 for wh in sizes for s in wh)
        if e.task == "sc":
            seen_edits.add(e.meta["edit_type"])
            seen_outcomes.add(e.meta["outcome"])
            assert len(e.images) == (3 if e.meta["edit_type"] == "transfer" else 2)
            assert sizes[0] == sizes[-1]
            tokens = re.findall(r"<\|bbox_(\d+)\|>", e.reasoning)
            assert [int(t) for t in tokens] == list(range(len(e.edit_region)))
            assert e.reasoning.count("<|global|>") == 1
    assert tasks == {"sc", "pq"}
    assert seen_edits == set(EDIT_TYPES)
    assert seen_outcomes == {"full", "partial", "failed", "wrong", "overedit"}


def test_boxes_are_the_tight_boxes_of_the_changed_pixels(sample):
    checked = 0
    for e in (e for e in sample if e.task == "sc"):
        original, edited = decode(e.images[0]), decode(e.images[-1])
        h, w = edited.shape[:2]
        changed = diff_mask(original, edited)
        boxes_px = e.meta["changed_bbox_px"]
        assert [tuple(to_grid(b, w, h)) for b in boxes_px] == [r.bbox_2d for r in e.edit_region]
        inside = np.zeros_like(changed)
        for x0, y0, x1, y1 in boxes_px:
            # tight: a changed pixel touches each of the four box edges
            assert changed[y0:y1, x0].any() and changed[y0:y1, x1 - 1].any()
            assert changed[y0, x0:x1].any() and changed[y1 - 1, x0:x1].any()
            inside[y0:y1, x0:x1] = True
        outcome = e.meta["outcome"]
        if outcome in ("full", "partial"):
            # nothing changed outside the boxes, and the boxes span exactly the change
            assert not (changed & ~inside).any(), e.id
            union = [min(b[0] for b in boxes_px), min(b[1] for b in boxes_px),
                     max(b[2] for b in boxes_px), max(b[3] for b in boxes_px)]  # fmt: skip
            assert union == bbox(changed)
            if len(boxes_px) == 1:
                assert e.edit_region[0].bbox_2d == to_grid(bbox(changed), w, h)
            checked += 1
        if outcome in ("overedit", "wrong"):
            x0, y0, x1, y1 = e.meta["unrelated_bbox_px"]
            assert changed[y0:y1, x0].any() and changed[y0:y1, x1 - 1].any()
            assert changed[y0, x0:x1].any() and changed[y1 - 1, x0:x1].any()
            assert e.score[1] < 25
    assert checked > 50


def test_outcome_scores_follow_the_rules(sample):
    for e in (e for e in sample if e.task == "sc"):
        truth, outcome = e.meta["truth"], e.meta["outcome"]
        assert e.score == (success_score(truth["completeness"]), overediting_score(truth["unrelated_fraction"]))
        original, edited = decode(e.images[0]), decode(e.images[-1])
        if outcome == "failed":
            assert e.edit_region == [] and e.score == (0, 25)
            if e.meta["failure"] == "identity":
                assert e.images[0] == e.images[-1]
            else:
                assert 0 < np.abs(original.astype(int) - edited.astype(int)).max() <= TOL
        elif outcome == "wrong":
            assert e.edit_region == [] and e.score[0] == 0
        elif outcome == "partial":
            assert 0 < e.score[0] < 25 and e.score[1] == 25
        elif outcome == "full":
            assert e.score == (25, 25) and e.edit_region
            # the requested area is exactly the changed pixels of a full edit
            assert truth["requested_pixels"] == diff_mask(original, edited).sum()
        else:
            assert e.score[0] == 25 and e.score[1] < 25 and e.edit_region


def test_instructions_name_the_edited_object(sample):
    for e in (e for e in sample if e.task == "sc"):
        kind = e.meta["edit_type"]
        assert e.instruction.endswith(".") and e.instruction[0].isupper()
        if kind in ("recolor", "remove", "resize", "move") and e.edit_region:
            label = e.edit_region[0].label.split(" (")[0]
            shape = label.split()[-1]
            assert shape in e.instruction, (e.instruction, label)
        if kind == "transfer":
            assert "image 2" in e.instruction or "second image" in e.instruction


def test_score_rules_are_monotone():
    assert success_score(1.0) == 25 and success_score(0.0) == 0
    assert overediting_score(0.0) == 25 and overediting_score(0.2) == 0 and overediting_score(1.0) == 0
    fracs = np.linspace(0, 0.3, 31)
    assert all(overediting_score(a) >= overediting_score(b) for a, b in zip(fracs, fracs[1:]))


@pytest.mark.parametrize("kind", R.ARTIFACTS)
def test_pq_scores_and_damage_grow_with_severity(kind):
    severities = np.linspace(0, 1, 11)
    scores = [pq_scores(kind, float(s)) for s in severities]
    assert scores[0] == (25, 25) and scores[-1][1] == 0
    assert all(a[0] >= b[0] and a[1] >= b[1] for a, b in zip(scores, scores[1:]))
    assert scores[2][0] > scores[-1][0]
    scene = generate_example(0, seed=2, cfg=SynthConfig(image_size=(96, 96), tasks=("sc",)))
    clean = decode(scene.images[-1])
    errors = [np.mean((R.inject_artifact(clean, kind, s, seed=4).astype(float) - clean) ** 2) for s in (0.2, 0.5, 0.9)]
    assert errors[0] > 0 and errors[0] < errors[1] < errors[2], errors


def test_pq_examples_carry_their_artifact_truth(sample):
    pq = [e for e in sample if e.task == "pq"]
    assert len(pq) > 30 and {e.meta["artifact"] for e in pq} >= set(R.ARTIFACTS)
    for e in pq:
        assert e.score == pq_scores(e.meta["artifact"], e.meta["severity"]) and e.instruction == ""
        assert (e.meta["artifact"] == "none") == (e.meta["severity"] == 0)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="image_size"):
        SynthConfig(image_size=(200, 100))
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig(edit_types=("explode",))


def test_throughput():
    start = time.perf_counter()
    n = sum(1 for _ in generate_examples(100, seed=1, image_size=(96, 256)))
    rate = n / (time.perf_counter() - start)
    assert rate > 10, f"{rate:.1f} examples/s"


def test_scene_backgrounds_and_object_sizes_follow_the_config():
    """`backgrounds` and `object_size` shape every drawn scene, the objects an `add` edit draws and
    the background a `background` edit picks; the defaults keep the generator's earlier draws."""
    from sr_jax.data.synthetic import example_rng, plan_edit, random_scene

    cfg = SynthConfig(image_size=(128, 160), backgrounds=("solid", "gradient"), object_size=(0.4, 0.45),
                      max_objects=2)
    kinds, adds = set(), 0
    for i in range(40):
        rng = example_rng(5, "train", i)
        scene = random_scene(rng, cfg)
        kinds.add(scene.background.kind)
        plan = plan_edit(rng, scene, "add", cfg)
        objects = scene.objects + ((plan.edited.objects[-1],) if plan else ())
        adds += plan is not None
        for obj in objects:
            if obj.shape not in R.ELONGATED_SHAPES:
                assert 0.4 * min(scene.width, scene.height) - 1e-6 <= obj.w <= 0.45 * min(scene.width, scene.height) + 1e-6
        bg = plan_edit(example_rng(6, "train", i), scene, "background", dataclasses.replace(cfg, backgrounds=("solid",)))
        assert bg.edited.background.kind == "solid"
    assert kinds == {"solid", "gradient"} and adds > 10
    wide = SynthConfig()
    assert wide.backgrounds == R.BACKGROUND_KINDS and wide.object_size == (0.2, 0.34)
    with pytest.raises(ValueError, match="backgrounds"):
        SynthConfig(backgrounds=("plaid",))
    with pytest.raises(ValueError, match="object_size"):
        SynthConfig(object_size=(0.5, 0.3))


def test_an_edit_type_listed_twice_is_drawn_twice_as_often():
    """Repeating a name in `edit_types` weights it (stage 3 of the learning check doubles recolor)."""
    spec = "synthetic:n=600,seed=2,split=train,min_side=96,max_side=96,tasks=sc,edit_types=add+recolor+recolor"
    source = SyntheticSource(spec)
    assert source.config.edit_types == ("add", "recolor", "recolor")
    kinds = [source.fetch(i).meta["edit_type"] for i in range(len(source))]
    share = kinds.count("recolor") / len(kinds)
    assert set(kinds) == {"add", "recolor"} and 0.6 < share < 0.73, share  # 2/3 expected; 1/2 if deduplicated


def test_failed_pairs_differ_only_in_the_edited_image():
    """`failed_pairs=1`: examples 2j and 2j+1 share scene, instruction and original image; 2j's edit
    failed (the edited image shows no change), 2j+1's was carried out (boxes, a changed image)."""
    spec = ("synthetic:n=40,seed=4,split=train,min_side=96,max_side=96,tasks=sc,min_objects=1,max_objects=2,"
            "outcome_weights=0.4+0.1+0.35+0+0.15,failed_pairs=1")
    source = SyntheticSource(spec)
    assert source.config.failed_pairs
    done_outcomes = set()
    for j in range(len(source) // 2):
        failed, done = source.fetch(2 * j), source.fetch(2 * j + 1)
        assert failed.meta["pair"] == done.meta["pair"] == j
        assert failed.instruction == done.instruction and failed.meta["edit_type"] == done.meta["edit_type"]
        assert failed.images[0] == done.images[0]  # the same original image
        assert failed.meta["outcome"] == "failed" and not failed.edit_region and failed.score[0] == 0
        assert done.meta["outcome"] != "failed" and done.edit_region and done.score[0] > 0
        assert not diff_mask(decode(failed.images[0]), decode(failed.images[-1])).any()
        assert diff_mask(decode(done.images[0]), decode(done.images[-1])).any()
        done_outcomes.add(done.meta["outcome"])
    assert done_outcomes == {"full", "partial", "overedit"}  # drawn by the other outcomes' weights
    # Without pairs the same index draws its own scene: the option changes nothing else.
    plain = SyntheticSource(spec.replace(",failed_pairs=1", ""))
    assert not plain.config.failed_pairs and "pair" not in plain.fetch(3).meta
    with pytest.raises(ValueError, match="tasks must be sc alone"):
        SynthConfig(tasks=("sc", "pq"), failed_pairs=True)
    with pytest.raises(ValueError, match="'wrong' must weigh 0"):
        SynthConfig(tasks=("sc",), failed_pairs=True, outcome_weights=(0.5, 0.1, 0.2, 0.1, 0.1))
    with pytest.raises(ValueError, match="failed_pairs"):
        SyntheticSource(spec.replace("failed_pairs=1", "failed_pairs=yes"))


def test_locate_absent_names_an_object_the_image_lacks():
    """`locate_absent`: that share of locate prompts names another object (a shape of another family
    or a clearly different colour) and is answered with an empty region list; the images, and the
    answers of the other examples, are those of the same source without the option."""
    import json

    spec = "synthetic:n=300,seed=3,split=train,min_side=96,max_side=96,tasks=locate,locate_size=0.3+0.6"
    with_absent, plain = SyntheticSource(spec + ",locate_absent=0.4"), SyntheticSource(spec)
    families = ({"square", "rectangle"}, {"circle", "ellipse", "ring"})
    absent = 0
    for i in range(len(plain)):
        e, p = with_absent.fetch(i), plain.fetch(i)
        assert e.images == p.images and "absent" not in p.meta
        if "absent" not in e.meta:
            assert e.meta["answer"] == p.meta["answer"] and e.edit_region == p.edit_region
            continue
        absent += 1
        answer = json.loads(e.meta["answer"])
        assert answer["edit_region"] == [] and not e.edit_region and e.meta["absent"] in answer["reasoning"]
        drawn_colour, drawn_shape = e.meta["object"].split(" ")[-2:]
        named_colour, named_shape = e.meta["absent"].split(" ")[-2:]
        assert re.search(rf"\b{named_colour} {named_shape}\b", e.meta["prompt"])
        assert named_shape in R.SHAPES and named_colour in R.COLOURS
        if named_shape != drawn_shape:  # shape swapped: never a look-alike, colour kept
            assert named_colour == drawn_colour
            assert not any({named_shape, drawn_shape} <= family for family in families)
        else:  # colour swapped: far from the drawn one in some channel
            gap = np.abs(np.subtract(R.COLOURS[named_colour], R.COLOURS[drawn_colour])).max()
            assert gap >= 80
    assert 0.3 < absent / len(plain) < 0.5
    with pytest.raises(ValueError, match="locate_absent"):
        SynthConfig(tasks=("sc",), locate_absent=0.2)
    with pytest.raises(ValueError, match="locate_absent must lie"):
        SynthConfig(tasks=("locate",), locate_absent=1.5)
