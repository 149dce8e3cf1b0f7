"""The embedded synthetic spatial-edit dataset: seeded scenes, edits with exact ground truth.

Each example is drawn from its own random stream `default_rng([seed, split_code, index])`, so
generation is deterministic, can start anywhere (`start=`), and the train/validation/test
splits never share a stream (held-out data = unseen seeds).

SC examples: images = [original(s)..., edited]. Edit types: add, remove, recolor, move,
resize, background (replace it), transfer (multi-input: "put the X from image 2 into image 1").
Outcomes of an edit:
  full      the requested change, nothing else
  partial   only part of the requested change (a straight cut through its changed pixels)
  failed    edited == original ("identity") or differs only by imperceptible noise below
            CHANGE_TOL ("imperceptible")
  wrong     the requested change is absent, an unrelated change happened instead
  overedit  the requested change plus an unrelated change
Rules (pure functions below, all ground truth also stored in `example.meta`):
  changed pixels: some channel differs by more than CHANGE_TOL between original[0] and edited.
  requested area A: changed pixels of the *full* edit that lie in the edit's own geometry.
  edit_region: one box per part of the requested edit (move has two: new and old place), each
      the bounding box of the changed pixels inside that part's area. Unrelated changes are
      never boxed: boxes say where the requested edit happened; the unrelated change shows up
      in the over-editing score and the <|global|> reasoning. No requested change -> [].
  box normalisation (`normalize_box`): pixel box [x0, x1) -> floor(1000*x0/W), ceil(1000*x1/W).
  success    = round(25 * completeness), completeness = share of A whose pixels equal the
               full edit (1 full/overedit, the kept share for partial, 0 failed/wrong).
  overediting = round(25 * (1 - min(1, sqrt(f / OVEREDIT_FULL_PENALTY)))), f = share of the
               pixels outside A that changed (25 = nothing else changed).
PQ examples: images = [edited image with an injected artifact]; artifact in blur, noise,
blotch, jpeg (or none) with severity s in [0, 1]:
  artifacts  = round(25 * (1 - s));  naturalness = round(25 * (1 - NATURALNESS_WEIGHT[kind] * s)).

Grounding tasks for the staged learning check (issue 19); each is the only task of its config
and builds verbatim records (records.py) whose prompt and answer are trained as given:
  colour   one image filled with one of COLOUR_TASK_COLOURS (light noise, brightness jitter);
           answer {"colour": NAME}; truth in meta["colour"]. task "pq" (one image, no boxes).
  locate   one object (random shape, colour, texture) on a plain or gradient background; answer
           {"edit_region": [{"id": 0, "label": NAME, "bbox_2d": BOX}]}, BOX = normalize_box of
           the bounding box of the object's pixels; truth in `edit_region` (answer_parsed), so
           the metrics and the GRPO `iou` reward read it like an SC record's. task "sc".
  diff     an SC edit (original, edited) with no instruction: "which area differs?"; answer
           {"edit_region": [...], "reasoning": "<|bbox_k|> what now looks different ... <|global|> ..."},
           the SC record's boxes and part descriptions ([] and "identical"/"imperceptible" for a
           failed edit). Every answer token needs the two images compared, where in an SC answer
           most boxes can be placed from the instruction and the edited image alone. Outcomes full,
           partial and failed only (wrong/overedit changes are not boxed, so their weights must be 0).
meta["synthetic_task"] names the task of these records (sc and pq records leave it out).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import zlib
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from sr_jax.data import synth_render as R
from sr_jax.data.records import IMAGE_TAG, SCORE_RANGE, Region, SpatialExample

EDIT_TYPES = ("add", "remove", "recolor", "move", "resize", "background", "transfer")
OUTCOMES = ("full", "partial", "failed", "wrong", "overedit")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
OVEREDIT_FULL_PENALTY = 0.2  # changing this share of the untouched pixels scores 0
NATURALNESS_WEIGHT = {"none": 0.0, "blur": 0.5, "noise": 0.6, "blotch": 0.9, "jpeg": 0.6}
MIN_CHANGED_PIXELS = 24  # an edit part smaller than this is not a visible edit
GENERATOR = "sr_jax.synthetic/1"
TASKS = ("sc", "pq", "colour", "locate", "diff")
SOLO_TASKS = ("colour", "locate", "diff")  # built by their own generator: never mixed with other tasks
# The colour task's classes: the object colours farthest apart (white/black/brown/gray left out).
COLOUR_TASK_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "cyan")
LOCATE_MIN_CONTRAST = 80  # max channel difference between an object's and its background's colours


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    image_size: tuple[int, int] = (96, 256)  # min and max side, pixels (each side independently)
    tasks: tuple[str, ...] = ("sc", "pq")
    pq_fraction: float = 0.3  # share of PQ examples when both tasks are on
    edit_types: tuple[str, ...] = EDIT_TYPES  # drawn uniformly from this tuple: a type listed twice, twice as often
    outcome_weights: tuple[float, ...] = (0.5, 0.13, 0.12, 0.1, 0.15)  # aligned with OUTCOMES
    min_objects: int = 2
    max_objects: int = 5
    clean_pq_fraction: float = 0.2  # PQ examples without any artifact
    png_compress_level: int = 1  # speed over size; PNG stays lossless either way
    locate_size: tuple[float, float] = (0.2, 0.45)  # locate: object's mean side / image's shorter side
    object_size: tuple[float, float] = (0.2, 0.34)  # sc/pq: an object's side / image's shorter side
    backgrounds: tuple[str, ...] = R.BACKGROUND_KINDS  # sc/pq scene backgrounds (background edits too)
    # Contrast pairs (sc only): examples 2j and 2j+1 share scene, instruction and edit; in 2j the
    # edit failed, in 2j+1 its outcome is drawn from the other outcomes' weights. Trained next to
    # each other (`data.shuffle_group: 2`), the pair's only difference is the edited image.
    failed_pairs: bool = False
    # locate only: the share of examples whose prompt names an object the image does not hold (the
    # drawn object's shape, or its colour, swapped for another); their answer is an empty region
    # list. The region list then opens with ' [],' or ' [{"', the tokens of the SC edit / no-edit
    # decision: a curriculum for "is what the text names in the image?" on a single image.
    locate_absent: float = 0.0

    def __post_init__(self):
        lo, hi = self.image_size
        if not 48 <= lo <= hi:
            raise ValueError(f"image_size must satisfy 48 <= min <= max, got {self.image_size}")
        for key, known in (("tasks", TASKS), ("edit_types", EDIT_TYPES), ("backgrounds", R.BACKGROUND_KINDS)):
            bad = set(getattr(self, key)) - set(known)
            if bad or not getattr(self, key):
                raise ValueError(f"unknown or empty {key}: {sorted(bad) or '[]'} (known: {', '.join(known)})")
        solo = set(self.tasks) & set(SOLO_TASKS)
        if solo and len(self.tasks) != 1:
            raise ValueError(f"task {sorted(solo)[0]!r} cannot be mixed with other tasks, got {list(self.tasks)}")
        if len(self.outcome_weights) != len(OUTCOMES) or min(self.outcome_weights) < 0:
            raise ValueError(f"outcome_weights needs {len(OUTCOMES)} non-negative numbers {OUTCOMES}")
        unboxed = [o for o, w in zip(OUTCOMES, self.outcome_weights) if w > 0 and o in ("wrong", "overedit")]
        if self.tasks == ("diff",) and unboxed:
            raise ValueError(f"task 'diff' boxes only the requested edit: outcome_weights for {unboxed} must be 0")
        for key in ("locate_size", "object_size"):
            if len(getattr(self, key)) != 2:
                raise ValueError(f"{key} must be two numbers (min, max), got {getattr(self, key)}")
        if not 0.05 <= self.locate_size[0] <= self.locate_size[1] <= 0.9:
            raise ValueError(f"locate_size must satisfy 0.05 <= min <= max <= 0.9, got {self.locate_size}")
        if not 0.05 <= self.object_size[0] <= self.object_size[1] <= 0.6:
            raise ValueError(f"object_size must satisfy 0.05 <= min <= max <= 0.6, got {self.object_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0.0 <= self.locate_absent <= 1.0:
            raise ValueError(f"locate_absent must lie in 0..1, got {self.locate_absent}")
        if self.locate_absent > 0 and self.tasks != ("locate",):
            raise ValueError(f"locate_absent names objects for task 'locate' alone, got {list(self.tasks)}")
        if self.failed_pairs and self.tasks != ("sc",):
            raise ValueError(f"failed_pairs pairs SC edits: tasks must be sc alone, got {list(self.tasks)}")
        if self.failed_pairs and sum(w for o, w in zip(OUTCOMES, self.outcome_weights) if o != "failed") <= 0:
            raise ValueError("failed_pairs needs a positive outcome weight other than failed's")
        if self.failed_pairs and self.outcome_weights[OUTCOMES.index("wrong")] > 0:
            raise ValueError("failed_pairs: the second of a pair carries the edit out, so outcome 'wrong' must weigh 0")


# ---------------------------------------------------------------- score rules


def success_score(completeness: float) -> int:
    return int(round(SCORE_RANGE * min(1.0, max(0.0, completeness))))


def overediting_score(unrelated_fraction: float) -> int:
    penalty = min(1.0, math.sqrt(max(0.0, unrelated_fraction) / OVEREDIT_FULL_PENALTY))
    return int(round(SCORE_RANGE * (1.0 - penalty)))


def pq_scores(kind: str, severity: float) -> tuple[int, int]:
    """(naturalness, artifacts) for an injected artifact; non-increasing in severity."""
    s = min(1.0, max(0.0, severity))
    naturalness = int(round(SCORE_RANGE * (1.0 - NATURALNESS_WEIGHT[kind] * s)))
    artifacts = int(round(SCORE_RANGE * (1.0 - s)))
    return naturalness, artifacts


# ---------------------------------------------------------------- scenes


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: R.Obj) -> str:
    """'striped red star' (texture adjective omitted for solid fills)."""
    return " ".join(p for p in (R.TEXTURE_ADJECTIVE[obj.texture], obj.colour, obj.shape) if p)


def _random_obj(rng: np.random.Generator, width: int, height: int, *, shape=None, colour=None, centre=None,
                size: tuple[float, float] = (0.2, 0.34)) -> R.Obj:
    shape = shape or str(rng.choice(R.SHAPES))
    side = rng.uniform(*size) * min(width, height)
    w = h = side
    if shape in R.ELONGATED_SHAPES:
        ratio = rng.uniform(1.35, 1.7)
        w, h = (side * ratio, side / ratio * 1.2) if rng.random() < 0.5 else (side / ratio * 1.2, side * ratio)
    w, h = max(14.0, w), max(14.0, h)
    cx, cy = centre if centre is not None else (rng.uniform(0, width), rng.uniform(0, height))
    texture = str(rng.choice(R.TEXTURES, p=[0.4, 0.15, 0.15, 0.15, 0.15]))
    obj = R.Obj(
        shape=shape, colour=colour or str(rng.choice(list(R.COLOURS))), texture=texture,
        cx=float(cx), cy=float(cy), w=float(w), h=float(h),
        tex_seed=int(rng.integers(2**31)), tex_param=int(rng.integers(4, 11)),
    )  # fmt: skip
    return R.clamp_centre(obj, width, height)


def _box_overlap(a: R.Obj, b: R.Obj) -> float:
    """Intersection over the smaller box area."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    iw, ih = min(ax1, bx1) - max(ax0, bx0), min(ay1, by1) - max(ay0, by0)
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))


def _fits(obj: R.Obj, others, max_overlap: float = 0.15) -> bool:
    return all(_box_overlap(obj, o) <= max_overlap for o in others)


def _unambiguous(objects, obj: R.Obj, scene_w: int, scene_h: int) -> bool:
    """Objects sharing colour and shape must sit clearly inside different grid cells, so that a
    position word tells them apart."""
    twins = [o for o in objects if o.name == obj.name]
    if not twins:
        return True
    cells = [R.clear_cell(o.cx, o.cy, scene_w, scene_h) for o in twins + [obj]]
    return None not in cells and len(set(cells)) == len(cells)


def _random_background(rng: np.random.Generator, avoid: R.Background | None = None,
                       kinds: tuple[str, ...] = R.BACKGROUND_KINDS) -> R.Background:
    names = list(R.BACKGROUND_COLOURS)
    while True:
        kind = str(rng.choice(kinds))
        c1, c2 = (str(c) for c in rng.choice(names, 2, replace=False))
        bg = R.Background(kind, (c1, c2), int(rng.integers(2**31)), int(rng.integers(8, 24)))
        if avoid is None or (bg.kind, bg.colours[0]) != (avoid.kind, avoid.colours[0]):
            return bg


def _background_desc(bg: R.Background) -> str:
    c1, c2 = bg.colours
    return {
        "solid": f"a plain {c1} background",
        "gradient": f"a {c1} to {c2} gradient",
        "noise": f"a speckled {c1} texture",
        "stripes": f"{c1} and {c2} stripes",
    }[bg.kind]


def random_scene(rng: np.random.Generator, cfg: SynthConfig, n_objects: int | None = None) -> R.Scene:
    lo, hi = cfg.image_size
    width, height = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    n = n_objects or int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[R.Obj] = []
    for _ in range(n * 8):
        if len(objects) == n:
            break
        twin = objects[int(rng.integers(len(objects)))] if objects and rng.random() < 0.15 else None
        obj = _random_obj(rng, width, height, shape=twin and twin.shape, colour=twin and twin.colour,
                          size=cfg.object_size)
        if _fits(obj, objects) and _unambiguous(objects, obj, width, height):
            objects.append(obj)
    return R.Scene(width, height, _random_background(rng, kinds=cfg.backgrounds), tuple(objects))


def _where_suffix(obj: R.Obj, scene: R.Scene) -> str:
    """' in the top left' when the object clearly sits in one grid cell, else ''."""
    cell = R.clear_cell(obj.cx, obj.cy, scene.width, scene.height)
    return f" {R.where_phrase(cell)}" if cell else ""


def refer(scene: R.Scene, index: int, style: float) -> str:
    """Shortest unambiguous name of an object ('star', 'red star', 'red star on the left');
    `style` in [0, 1) sometimes picks a longer name than needed, for variety."""
    obj = scene.objects[index]
    others = [o for j, o in enumerate(scene.objects) if j != index]
    cell = R.clear_cell(obj.cx, obj.cy, scene.width, scene.height)
    unique = all(o.name != obj.name for o in others)
    if all(o.shape != obj.shape for o in others) and style < 0.2:
        return obj.shape
    if unique and (style < 0.75 or cell is None):
        return obj.name
    return f"{obj.name} {R.where_phrase(cell)}"


# ---------------------------------------------------------------- edits


@dataclasses.dataclass
class EditPlan:
    edit_type: str
    instruction: str
    originals: list[R.Scene]  # the scene being edited first
    edited: R.Scene
    parts: list[tuple[str, np.ndarray]]  # (label, area of the image where this part happens)
    done: list[str]  # per part: what the completed part looks like
    missing: str  # what one sees when the edit did not happen
    protected: frozenset[int]  # edited-scene objects that the edit itself touched


def _pick_target(rng, scene: R.Scene) -> int | None:
    """A clearly visible object (most of its pixels uncovered)."""
    order = rng.permutation(len(scene.objects))
    for i in order:
        i = int(i)
        full = R.footprint(scene.objects[i], scene.width, scene.height).sum()
        if full and R.visible_mask(scene, i).sum() >= 0.7 * full:
            return i
    return None


def _with_objects(scene: R.Scene, objects) -> R.Scene:
    return dataclasses.replace(scene, objects=tuple(objects))


def _plan_recolor(rng, scene: R.Scene) -> EditPlan | None:
    i = _pick_target(rng, scene)
    if i is None:
        return None
    obj = scene.objects[i]
    new = str(rng.choice([c for c in R.COLOURS if c != obj.colour]))
    ref = refer(scene, i, rng.random())
    objs = list(scene.objects)
    objs[i] = dataclasses.replace(obj, colour=new)
    edited = _with_objects(scene, objs)
    template = rng.choice(["Change the {r} to {c}.", "Make the {r} {c}.", "Recolor the {r} {c}.",
                           "Turn the {r} {c}.", "Paint the {r} {c}."])  # fmt: skip
    return EditPlan(
        "recolor", template.format(r=ref, c=new), [scene], edited,
        [(objs[i].name, R.visible_mask(edited, i))],
        [f"the {ref} is now {new}"], f"the {ref} is still {obj.colour}", frozenset({i}),
    )  # fmt: skip


def _plan_remove(rng, scene: R.Scene) -> EditPlan | None:
    i = _pick_target(rng, scene)
    if i is None:
        return None
    obj, ref = scene.objects[i], refer(scene, i, rng.random())
    edited = _with_objects(scene, scene.objects[:i] + scene.objects[i + 1 :])
    template = rng.choice(["Remove the {r}.", "Delete the {r}.", "Erase the {r} from the image.", "Get rid of the {r}."])
    return EditPlan(
        "remove", template.format(r=ref), [scene], edited,
        [(obj.name, R.visible_mask(scene, i))],
        [f"the {ref} is gone and what was behind it shows through"], f"the {ref} is still there",
        frozenset(),
    )  # fmt: skip


def _place_new(rng, scene: R.Scene, make: Callable[[tuple[float, float]], R.Obj]):
    """A new object inside a random grid cell, not hiding the existing objects."""
    for _ in range(12):
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        obj = make(R.point_in_cell(rng, cell, scene.width, scene.height))
        if R.clear_cell(obj.cx, obj.cy, scene.width, scene.height) == cell and _fits(obj, scene.objects, 0.3):
            return obj, cell
    return None, None


def _plan_add(rng, scene: R.Scene, cfg: SynthConfig) -> EditPlan | None:
    obj, cell = _place_new(rng, scene, lambda c: _random_obj(rng, scene.width, scene.height, centre=c,
                                                             size=cfg.object_size))
    if obj is None:
        return None
    edited = _with_objects(scene, scene.objects + (obj,))
    desc, where = _describe(obj), R.where_phrase(cell)
    template = rng.choice(["Add {d} {w}.", "Place {d} {w}.", "Put {d} {w}.", "Draw {d} {w}."])
    return EditPlan(
        "add", template.format(d=_article(desc), w=where), [scene], edited,
        [(obj.name, R.footprint(obj, scene.width, scene.height))],
        [f"{_article(desc)} now sits {where}"], f"there is no {desc} {where}",
        frozenset({len(edited.objects) - 1}),
    )  # fmt: skip


def _plan_move(rng, scene: R.Scene) -> EditPlan | None:
    i = _pick_target(rng, scene)
    if i is None:
        return None
    obj, ref = scene.objects[i], refer(scene, i, rng.random())
    old_cell = R.object_cell(obj, scene)
    old_where = _where_suffix(obj, scene)
    others = scene.objects[:i] + scene.objects[i + 1 :]
    for _ in range(12):
        cell = (int(rng.integers(3)), int(rng.integers(3)))
        if cell == old_cell:
            continue
        cx, cy = R.point_in_cell(rng, cell, scene.width, scene.height)
        moved = R.clamp_centre(dataclasses.replace(obj, cx=cx, cy=cy), scene.width, scene.height)
        if R.clear_cell(moved.cx, moved.cy, scene.width, scene.height) == cell and _box_overlap(moved, obj) < 0.5 and _fits(moved, others, 0.3):
            break
    else:
        return None
    # A moved object is drawn on top, as an editor pastes it.
    edited = _with_objects(scene, others + (moved,))
    name = R.cell_name(cell)
    template = rng.choice(["Move the {r} to the {c}.", "Shift the {r} to the {c}.", "Drag the {r} over to the {c}."])
    return EditPlan(
        "move", template.format(r=ref, c=name), [scene], edited,
        [(obj.name, R.footprint(moved, scene.width, scene.height)),
         (f"{obj.name} (old position)", R.visible_mask(scene, i))],
        [f"the {obj.name} now sits {R.where_phrase(cell)}",
         f"its old place{old_where} is empty"],
        f"the {ref} has not moved", frozenset({len(edited.objects) - 1}),
    )  # fmt: skip


def _plan_resize(rng, scene: R.Scene) -> EditPlan | None:
    i = _pick_target(rng, scene)
    if i is None:
        return None
    obj, ref = scene.objects[i], refer(scene, i, rng.random())
    bigger = rng.random() < 0.5
    factor = rng.uniform(1.35, 1.6) if bigger else rng.uniform(0.55, 0.72)
    w, h = obj.w * factor, obj.h * factor
    if min(w, h) < 12 or w > 0.95 * scene.width or h > 0.95 * scene.height:
        return None
    objs = list(scene.objects)
    objs[i] = R.clamp_centre(dataclasses.replace(obj, w=w, h=h), scene.width, scene.height)
    edited = _with_objects(scene, objs)
    word = "bigger" if bigger else "smaller"
    templates = (["Make the {r} bigger.", "Enlarge the {r}.", "Scale up the {r}.", "Make the {r} larger."]
                 if bigger else ["Make the {r} smaller.", "Shrink the {r}.", "Scale down the {r}."])  # fmt: skip
    return EditPlan(
        "resize", rng.choice(templates).format(r=ref), [scene], edited,
        [(obj.name, R.visible_mask(scene, i) | R.visible_mask(edited, i))],
        [f"the {ref} is now clearly {word}"], f"the {ref} still has its original size", frozenset({i}),
    )  # fmt: skip


def _plan_background(rng, scene: R.Scene, cfg: SynthConfig) -> EditPlan | None:
    bg = _random_background(rng, avoid=scene.background, kinds=cfg.backgrounds)
    edited = dataclasses.replace(scene, background=bg)
    desc = _background_desc(bg)
    template = rng.choice(["Replace the background with {d}.", "Change the background to {d}.",
                           "Swap the background for {d}."])  # fmt: skip
    return EditPlan(
        "background", template.format(d=desc), [scene], edited,
        [("background", R.background_mask(scene))],
        [f"the background is now {desc}"], "the background is unchanged",
        frozenset(range(len(scene.objects))),
    )  # fmt: skip


def _plan_transfer(rng, scene: R.Scene, cfg: SynthConfig) -> EditPlan | None:
    source = random_scene(rng, cfg)
    j = _pick_target(rng, source)
    if j is None:
        return None
    src, ref = source.objects[j], refer(source, j, rng.random())
    scale = min(scene.width, scene.height) / min(source.width, source.height)

    def make(centre):
        moved = dataclasses.replace(src, cx=centre[0], cy=centre[1], w=src.w * scale, h=src.h * scale)
        return R.clamp_centre(moved, scene.width, scene.height)

    obj, cell = _place_new(rng, scene, make)
    if obj is None or obj.w > 0.95 * scene.width or obj.h > 0.95 * scene.height:
        return None
    edited = _with_objects(scene, scene.objects + (obj,))
    where = R.where_phrase(cell)
    template = rng.choice(["Put the {r} from image 2 into image 1, {w}.",
                           "Add the {r} from the second image to the first image, {w}.",
                           "Copy the {r} from image 2 and place it {w} in image 1."])  # fmt: skip
    return EditPlan(
        "transfer", template.format(r=ref, w=where), [scene, source], edited,
        [(obj.name, R.footprint(obj, scene.width, scene.height))],
        [f"the {obj.name} from image 2 now sits {where} in image 1"],
        f"image 1 has no {obj.name} {where}", frozenset({len(edited.objects) - 1}),
    )  # fmt: skip


def plan_edit(rng, scene: R.Scene, edit_type: str, cfg: SynthConfig) -> EditPlan | None:
    if edit_type in ("transfer", "add", "background"):  # the builders that draw objects or backgrounds
        return {"transfer": _plan_transfer, "add": _plan_add, "background": _plan_background}[edit_type](rng, scene, cfg)
    builder = {"remove": _plan_remove, "recolor": _plan_recolor, "move": _plan_move, "resize": _plan_resize}[edit_type]
    return builder(rng, scene)


# ---------------------------------------------------------------- unrelated changes


def _unrelated_change(rng, plan: EditPlan, image: np.ndarray) -> tuple[np.ndarray, str, str] | None:
    """Applies one change the instruction did not ask for to the fully edited scene.
    Returns (image, description, kind)."""
    scene = plan.edited
    free = [i for i in range(len(scene.objects)) if i not in plan.protected]
    kinds = ["tint", "blotch", "add_other"] + (["recolor_other", "remove_other", "move_other"] * 2 if free else [])
    kind = str(rng.choice(kinds))
    if kind == "tint":
        shift = rng.choice([-1, 1]) * rng.uniform(25, 45) * np.array([1.0, 0.6, 0.2])[rng.permutation(3)]
        out = np.clip(image.astype(np.float32) + shift, 0, 255).astype(np.uint8)
        return out, "the colours of the whole image shifted (a colour cast)", kind
    if kind == "blotch":
        seed = int(rng.integers(2**31))
        out = R.inject_artifact(image, "blotch", 0.0001, seed)  # one blotch, smallest size
        cx, cy = R.blotch_centre(0.0001, seed, scene.width, scene.height)
        where = R.where_phrase(R.cell_of(cx, cy, scene.width, scene.height))
        return out, f"a smudge of foreign colour was painted {where}", kind
    if kind == "add_other":
        obj, cell = _place_new(rng, scene, lambda c: _random_obj(rng, scene.width, scene.height, centre=c))
        if obj is None:
            return None
        out = R.render(_with_objects(scene, scene.objects + (obj,)))
        return out, f"{_article(obj.name)} appeared {R.where_phrase(cell)}", kind
    i = free[int(rng.integers(len(free)))]
    obj = scene.objects[i]
    where = _where_suffix(obj, scene)
    objs = list(scene.objects)
    if kind == "recolor_other":
        new = str(rng.choice([c for c in R.COLOURS if c != obj.colour]))
        objs[i] = dataclasses.replace(obj, colour=new)
        text = f"the {obj.name}{where} was recoloured {new}"
    elif kind == "remove_other":
        del objs[i]
        text = f"the {obj.name}{where} was removed"
    else:
        dx, dy = rng.uniform(0.3, 0.6, 2) * rng.choice([-1, 1], 2) * (scene.width, scene.height)
        objs[i] = R.clamp_centre(dataclasses.replace(obj, cx=obj.cx + dx, cy=obj.cy + dy), scene.width, scene.height)
        text = f"the {obj.name}{where} was moved"
    return R.render(_with_objects(scene, objs)), text, kind


# ---------------------------------------------------------------- examples


def _png(img: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def _partial_keep(rng, area: np.ndarray) -> np.ndarray:
    """A straight cut through the requested area keeping 30..80% of its pixels."""
    ys, xs = np.nonzero(area)
    angle = rng.uniform(0, 2 * math.pi)
    proj = xs * math.cos(angle) + ys * math.sin(angle)
    threshold = np.quantile(proj, rng.uniform(0.3, 0.8))
    keep = np.zeros_like(area)
    keep[ys[proj <= threshold], xs[proj <= threshold]] = True
    return keep


def _sc_reasoning(plan: EditPlan, outcome: str, part_done: list[float], unrelated_text: str, failure: str) -> str:
    chunks = []
    for k, (text, done) in enumerate((t, d) for t, d in zip(plan.done, part_done) if d > 0):
        if done >= 1.0:
            chunks.append(f"<|bbox_{k}|> {text}.")
        else:
            chunks.append(f"<|bbox_{k}|> {text}, but only partly: about {round(100 * done)}% of it was changed.")
    if outcome == "full":
        tail = "The edit follows the instruction completely and the rest of the scene is unchanged."
    elif outcome == "partial":
        tail = "The edit is incomplete; nothing outside the edited area changed."
    elif outcome == "failed" and failure == "identity":
        tail = f"The edited image is identical to the original: {plan.missing}. The instruction was not carried out."
    elif outcome == "failed":
        tail = (f"The edited image differs from the original only by imperceptible pixel noise: {plan.missing}. "
                "The instruction was not carried out.")  # fmt: skip
    elif outcome == "wrong":
        tail = f"The requested edit is missing: {plan.missing}. Instead {unrelated_text}, which was not requested."
    else:
        tail = f"The requested change is complete, but {unrelated_text}, which was not requested."
    return " ".join(chunks + [f"<|global|> {tail}"])


def _sc_example(rng, cfg: SynthConfig, scene: R.Scene, plan: EditPlan,
                outcome: str | None = None) -> tuple[list[np.ndarray], dict] | None:
    """`outcome` "failed" forces a failed edit; "done" draws one of the other outcomes by weight."""
    original = R.render(scene)
    full = R.render(plan.edited)
    changed_full = R.changed_mask(original, full)
    parts = [changed_full & area for _, area in plan.parts]
    requested = np.logical_or.reduce(parts)
    if (changed_full & ~requested).any():
        raise AssertionError(f"{plan.edit_type}: the edit changed pixels outside its own parts")
    if min(int(p.sum()) for p in parts) < MIN_CHANGED_PIXELS:
        return None

    weights = np.asarray(cfg.outcome_weights, dtype=float)
    if outcome == "done":
        weights = np.where(np.asarray(OUTCOMES) == "failed", 0.0, weights)
    outcome = "failed" if outcome == "failed" else str(rng.choice(OUTCOMES, p=weights / weights.sum()))
    failure, unrelated_text, unrelated_kind = "", "", ""
    if outcome in ("wrong", "overedit"):
        for _ in range(4):
            change = _unrelated_change(rng, plan, full)
            if change is None:
                continue
            other, unrelated_text, unrelated_kind = change
            inside = full if outcome == "overedit" else original
            edited = np.where(requested[..., None], inside, other)
            if (R.changed_mask(edited, original) & ~requested).sum() >= MIN_CHANGED_PIXELS:
                break
        else:
            outcome, unrelated_text, unrelated_kind = ("full" if outcome == "overedit" else "failed"), "", ""
    if outcome == "full":
        edited = full
    elif outcome == "partial":
        edited = np.where(_partial_keep(rng, requested)[..., None], full, original)
    elif outcome == "failed":
        failure = str(rng.choice(["identity", "imperceptible"]))
        edited = original.copy()
        if failure == "imperceptible":
            jitter = rng.integers(-3, 4, original.shape)
            edited = np.clip(original.astype(np.int16) + jitter, 0, 255).astype(np.uint8)

    changed = R.changed_mask(edited, original)
    matches_full = ~R.changed_mask(edited, full, tol=0)
    completeness = float((matches_full & requested).sum() / requested.sum())
    outside = ~requested
    unrelated = changed & outside
    unrelated_fraction = float(unrelated.sum() / max(1, outside.sum()))
    part_done = [float((p & matches_full).sum() / p.sum()) for p in parts]

    regions, boxes_px = [], []
    for (label, _), part in zip(plan.parts, parts):
        box = R.mask_bbox(changed & part)
        if box is None:
            continue
        boxes_px.append(list(box))
        regions.append(Region(len(regions), label, R.normalize_box(box, scene.width, scene.height)))
    meta = {
        "edit_type": plan.edit_type,
        "outcome": outcome,
        "failure": failure,
        "unrelated_kind": unrelated_kind,
        "changed_bbox_px": boxes_px,
        "unrelated_bbox_px": list(R.mask_bbox(unrelated) or []),
        "truth": {
            "completeness": round(completeness, 6),
            "unrelated_fraction": round(unrelated_fraction, 6),
            "requested_pixels": int(requested.sum()),
            "changed_pixels": int(changed.sum()),
            "unrelated_pixels": int(unrelated.sum()),
        },
    }
    score = (success_score(completeness), overediting_score(unrelated_fraction))
    reasoning = _sc_reasoning(plan, outcome, part_done, unrelated_text, failure)
    images = [R.render(s) for s in plan.originals[1:]]
    return [original, *images, edited], dict(regions=regions, score=score, reasoning=reasoning, meta=meta)


_LEVELS = ((0.2, "slight"), (0.45, "moderate"), (0.7, "strong"), (1.01, "severe"))


def _pq_reasoning(kind: str, severity: float, where: str) -> str:
    if kind == "none":
        return ("The image is clean: shapes have crisp edges, colours are even and there are no visible "
                "artifacts such as blur, noise, blotches or compression blocks.")  # fmt: skip
    level = next(name for bound, name in _LEVELS if severity < bound)
    what = {
        "blur": f"{level} blur over the whole image: shape edges are soft and fine texture is smeared",
        "noise": f"{level} grainy noise over the whole image, most visible on flat colours",
        "blotch": f"{level} blotches of foreign colour, for example {where}, that belong to no object",
        "jpeg": f"{level} compression artifacts: blocky patches and ringing around the shape edges",
    }[kind]
    return f"The image shows {what}. The more visible this is, the less natural the scene looks."


def _pq_example(rng, cfg: SynthConfig, plan: EditPlan) -> tuple[list[np.ndarray], dict]:
    image = R.render(plan.edited)
    clean = rng.random() < cfg.clean_pq_fraction
    kind = "none" if clean else str(rng.choice(R.ARTIFACTS))
    severity = 0.0 if clean else round(float(rng.uniform(0.05, 1.0)), 2)
    seed = int(rng.integers(2**31))
    degraded = R.inject_artifact(image, kind, severity, seed)
    cx, cy = R.blotch_centre(severity, seed, image.shape[1], image.shape[0])
    where = R.where_phrase(R.cell_of(cx, cy, image.shape[1], image.shape[0]))
    meta = {"edit_type": plan.edit_type, "artifact": kind, "severity": severity, "artifact_seed": seed}
    return [degraded], dict(regions=[], score=pq_scores(kind, severity), reasoning=_pq_reasoning(kind, severity, where), meta=meta)


# ---------------------------------------------------------------- grounding tasks (issue 19)

# Our own short wordings; the model must read the image to answer any of them.
COLOUR_PROMPTS = (
    "<image>What colour fills this image? Answer in JSON with the key colour.",
    "<image>Name the colour of the picture as JSON: {\"colour\": ...}.",
    "<image>Which colour is this image? Reply with JSON holding colour.",
)
LOCATE_PROMPTS = (
    "<image>Where is the {d}? Answer in JSON with edit_region (one box, 0-1000).",
    "<image>Find the {d}. Give its box as JSON edit_region, coordinates 0-1000.",
    "<image>Locate the {d} and answer with its edit_region box (0-1000) in JSON.",
)


def _verbatim_example(kind: str, task: str, index: int, seed: int, split: str, cfg: SynthConfig,
                      images: list[np.ndarray], prompt: str, answer: dict, *, regions=(), instruction: str = "",
                      meta: dict) -> SpatialExample:
    return SpatialExample(
        id=f"synth-{kind}-{split}-{index:06d}",
        task=task,
        images=[_png(image, cfg.png_compress_level) for image in images],
        instruction=instruction,
        edit_region=list(regions),
        meta={
            "source": "synthetic", "generator": GENERATOR, "split": split, "seed": seed, "index": index,
            "image_sizes": [[int(im.shape[1]), int(im.shape[0])] for im in images], "synthetic_task": kind,
            "verbatim": True, "prompt": prompt, "answer": json.dumps(answer, separators=(", ", ": ")),
            "answer_parsed": bool(regions), **meta,
        },
    ).validate()  # fmt: skip


def _image_size(rng, cfg: SynthConfig) -> tuple[int, int]:
    lo, hi = cfg.image_size
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def colour_example(index: int, seed: int, split: str, cfg: SynthConfig) -> SpatialExample:
    """One image of a single colour with light per-pixel noise and a brightness shift, so that
    the answer needs the colour, not exact pixel values."""
    rng = example_rng(seed, split, index)
    width, height = _image_size(rng, cfg)
    name = str(rng.choice(COLOUR_TASK_COLOURS))
    shift = rng.uniform(-20, 20)
    noise = rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)
    image = np.clip(np.asarray(R.COLOURS[name], np.float32) + shift + noise, 0, 255).astype(np.uint8)
    prompt = str(rng.choice(COLOUR_PROMPTS))
    return _verbatim_example("colour", "pq", index, seed, split, cfg, [image], prompt, {"colour": name},
                             meta={"colour": name})


def _contrast(colour: str, bg: R.Background) -> int:
    c = np.asarray(R.COLOURS[colour], np.int32)
    return int(min(np.abs(c - np.asarray(R.BACKGROUND_COLOURS[b], np.int32)).max() for b in bg.colours))


def locate_example(index: int, seed: int, split: str, cfg: SynthConfig) -> SpatialExample:
    """One object on a plain or gradient background; the truth is the box of its pixels."""
    rng = example_rng(seed, split, index)
    width, height = _image_size(rng, cfg)
    for _ in range(100):
        bg = _random_background(rng)
        if bg.kind not in ("solid", "gradient"):
            bg = dataclasses.replace(bg, kind="solid")
        obj = _random_obj(rng, width, height)
        # the object's mean side, a share of the image's shorter side, drawn from locate_size
        scale = rng.uniform(*cfg.locate_size) * min(width, height) / math.sqrt(obj.w * obj.h)
        obj = R.clamp_centre(dataclasses.replace(obj, w=min(obj.w * scale, 0.9 * width),
                                                 h=min(obj.h * scale, 0.9 * height)), width, height)
        if _contrast(obj.colour, bg) >= LOCATE_MIN_CONTRAST:
            break
    else:
        raise RuntimeError(f"could not build locate example {index} (seed {seed}, split {split})")
    scene = R.Scene(width, height, bg, (obj,))
    box_px = R.mask_bbox(R.visible_mask(scene, 0))
    region = Region(0, obj.name, R.normalize_box(box_px, width, height))
    # drawn only when asked for, so that locate_absent=0 keeps the examples of earlier releases
    named = _absent_object(rng, obj) if cfg.locate_absent > 0 and rng.random() < cfg.locate_absent else obj
    prompt = str(rng.choice(LOCATE_PROMPTS)).format(d=_describe(named))
    meta = {"object": obj.name, "shape": obj.shape, "texture": obj.texture, "background": bg.kind,
            "box_px": list(box_px)}
    if named is not obj:
        # No closing full stop: '."' is a token the stage vocabulary (configs/vocab/learn_stages.json) lacks.
        answer = {"edit_region": [], "reasoning": f"<|global|> The image has no {_describe(named)}"}
        return _verbatim_example("locate", "sc", index, seed, split, cfg, [R.render(scene)], prompt, answer,
                                 instruction=prompt.replace(IMAGE_TAG, ""),
                                 meta={**meta, "absent": named.name})
    return _verbatim_example("locate", "sc", index, seed, split, cfg, [R.render(scene)], prompt,
                             {"edit_region": [region.to_json()]}, regions=[region],
                             instruction=prompt.replace(IMAGE_TAG, ""), meta=meta)


def _absent_object(rng, obj: R.Obj) -> R.Obj:
    """`obj` with its shape or its colour swapped for one it cannot be mistaken for: a shape of
    another family, or a colour at least LOCATE_MIN_CONTRAST away in some channel."""
    if rng.random() < 0.5:
        # shapes a coarse look confuses: elongated twins, and a ring against a disc
        kin = next((g for g in ({"square", "rectangle"}, {"circle", "ellipse", "ring"}) if obj.shape in g), {obj.shape})
        shapes = [s for s in R.SHAPES if s not in kin]
        return dataclasses.replace(obj, shape=str(rng.choice(shapes)))
    here = np.asarray(R.COLOURS[obj.colour], np.int32)
    colours = [c for c, v in R.COLOURS.items() if np.abs(np.asarray(v, np.int32) - here).max() >= LOCATE_MIN_CONTRAST]
    return dataclasses.replace(obj, colour=str(rng.choice(colours)))


DIFF_PROMPTS = (  # words the SC prompts and answers already use, so the stage vocabulary covers them
    "<image><image>Which area of the edited image differs from the original? Answer in JSON with edit_region "
    "(boxes 0-1000) and reasoning.",
    "<image><image>Find what changed in the edited image. Give its box as JSON edit_region, coordinates 0-1000, "
    "and reasoning.",
    "<image><image>What changed from the original to the edited image? Answer in JSON with edit_region "
    "(boxes 0-1000) and reasoning.",
)


def diff_example(index: int, seed: int, split: str, cfg: SynthConfig) -> SpatialExample:
    """An SC edit without its instruction: box and describe what differs between the two images."""
    rng = example_rng(seed, split, index)
    plan, images, fields = _edit_example(rng, "sc", index, seed, split, cfg)
    meta = fields["meta"]
    parts = fields["reasoning"].split("<|global|>")[0].strip()  # "<|bbox_k|> what the part looks like now."
    # No closing full stop: '."' is a token the stage vocabulary (configs/vocab/learn_stages.json) lacks.
    if meta["outcome"] == "failed" and meta["failure"] == "identity":
        tail = "The edited image is identical to the original"
    elif meta["outcome"] == "failed":
        tail = "The edited image differs from the original only by imperceptible pixel noise"
    else:
        tail = "The rest of the scene is unchanged"
    answer = {"edit_region": [r.to_json() for r in fields["regions"]],
              "reasoning": " ".join(filter(None, [parts, f"<|global|> {tail}"]))}
    return _verbatim_example("diff", "sc", index, seed, split, cfg, images, str(rng.choice(DIFF_PROMPTS)), answer,
                             regions=fields["regions"],
                             meta={k: meta[k] for k in ("edit_type", "outcome", "failure", "changed_bbox_px")})


def split_code(split: str) -> int:
    return SPLIT_CODES.get(split, 1000 + zlib.crc32(split.encode()))


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    return np.random.default_rng([seed, split_code(split), index])


def _edit_example(rng, task: str, index: int, seed: int, split: str, cfg: SynthConfig, outcome: str | None = None):
    """(plan, images, fields) of one SC or PQ example drawn from `rng` (`outcome`: `_sc_example`'s)."""
    for _ in range(100):
        scene = random_scene(rng, cfg)
        edit_type = str(rng.choice(cfg.edit_types))
        plan = plan_edit(rng, scene, edit_type, cfg)
        if plan is None:
            continue
        built = _pq_example(rng, cfg, plan) if task == "pq" else _sc_example(rng, cfg, scene, plan, outcome)
        if built is not None:
            return (plan, *built)
    raise RuntimeError(f"could not build example {index} (seed {seed}, split {split})")


def generate_example(index: int, seed: int, split: str = "train", cfg: SynthConfig | None = None) -> SpatialExample:
    cfg = cfg or SynthConfig()
    if cfg.tasks == ("colour",):
        return colour_example(index, seed, split, cfg)
    if cfg.tasks == ("locate",):
        return locate_example(index, seed, split, cfg)
    if cfg.tasks == ("diff",):
        return diff_example(index, seed, split, cfg)
    # A pair draws the same scene and edit from one generator; its two members part at the outcome.
    rng = example_rng(seed, split, index // 2 if cfg.failed_pairs else index)
    task = cfg.tasks[0] if len(cfg.tasks) == 1 else ("pq" if rng.random() < cfg.pq_fraction else "sc")
    outcome = ("done" if index % 2 else "failed") if cfg.failed_pairs else None
    plan, images, fields = _edit_example(rng, task, index, seed, split, cfg, outcome)
    meta = {
        "source": "synthetic", "generator": GENERATOR, "split": split, "seed": seed, "index": index,
        "image_sizes": [[int(im.shape[1]), int(im.shape[0])] for im in images],
        **fields["meta"],
        **({"pair": index // 2} if cfg.failed_pairs else {}),
    }  # fmt: skip
    return SpatialExample(
        id=f"synth-{split}-{index:06d}",
        task=task,
        images=[_png(im, cfg.png_compress_level) for im in images],
        instruction=plan.instruction if task == "sc" else "",
        edit_region=fields["regions"],
        reasoning=fields["reasoning"],
        score=tuple(float(s) for s in fields["score"]),
        meta=meta,
    ).validate()


def generate_examples(
    n: int,
    seed: int,
    split: str = "train",
    image_size: tuple[int, int] = (96, 256),
    tasks: tuple[str, ...] = ("sc", "pq"),
    *,
    start: int = 0,
    config: SynthConfig | None = None,
) -> Iterator[SpatialExample]:
    """Examples `start .. start+n-1` of a split. `config` wins over image_size/tasks."""
    cfg = config or SynthConfig(image_size=tuple(image_size), tasks=tuple(tasks))
    for index in range(start, start + n):
        yield generate_example(index, seed, split, cfg)
