"""Procedural scenes for the synthetic edit data: named shapes on textured backgrounds.

Nothing is anti-aliased, so every pixel belongs to exactly one object or to the background;
that is what makes the changed-pixel ground truth of an edit exact. Scenes are frozen
dataclasses: an edit is `dataclasses.replace` on a scene, and rendering is a pure function.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Named object colours, far apart so that a recolour changes every channel-max by > 90.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
# Background tones are muted so objects stand out; names are used in instructions.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "beige": (225, 215, 190),
    "light gray": (200, 200, 205),
    "pale blue": (185, 205, 230),
    "pale green": (195, 225, 195),
    "dark slate": (55, 65, 80),
    "sand": (210, 185, 140),
    "lavender": (215, 200, 235),
    "cream": (250, 245, 222),
    "charcoal": (45, 45, 48),
    "olive": (120, 125, 80),
}
SHAPES = ("square", "rectangle", "circle", "ellipse", "triangle", "star", "ring", "diamond", "cross", "hexagon")
# Shapes drawn in a box with unequal sides (all others get width == height).
ELONGATED_SHAPES = frozenset({"rectangle", "ellipse"})
TEXTURES = ("solid", "stripes", "checker", "gradient", "noise")
TEXTURE_ADJECTIVE = {"solid": "", "stripes": "striped", "checker": "checkered", "gradient": "gradient", "noise": "speckled"}
BACKGROUND_KINDS = ("solid", "gradient", "noise", "stripes")
ARTIFACTS = ("blur", "noise", "blotch", "jpeg")

# A pixel counts as changed when some channel differs by more than this (0..255 scale).
CHANGE_TOL = 12


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str
    cx: float  # centre, pixels
    cy: float
    w: float  # extent, pixels
    h: float
    tex_seed: int
    tex_param: int  # stripe period / checker cell / gradient axis / noise strength

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), end exclusive."""
        x0 = int(round(self.cx - self.w / 2))
        y0 = int(round(self.cy - self.h / 2))
        return x0, y0, x0 + max(1, int(round(self.w))), y0 + max(1, int(round(self.h)))


@dataclasses.dataclass(frozen=True)
class Background:
    kind: str
    colours: tuple[str, str]
    seed: int
    param: int  # stripe period or gradient axis


@dataclasses.dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    objects: tuple[Obj, ...]


# ---------------------------------------------------------------- geometry


def cell_of(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """3x3 grid cell (col, row) of a point; used for position words."""
    col = min(2, max(0, int(3 * x / width)))
    row = min(2, max(0, int(3 * y / height)))
    return col, row


_CELL_NAME = {
    (0, 0): "top left", (1, 0): "top", (2, 0): "top right",
    (0, 1): "left", (1, 1): "center", (2, 1): "right",
    (0, 2): "bottom left", (1, 2): "bottom", (2, 2): "bottom right",
}  # fmt: skip


def clear_cell(x: float, y: float, width: int, height: int, margin: float = 0.1) -> tuple[int, int] | None:
    """The grid cell of a point, or None when the point lies within `margin` (a fraction of a
    cell) of a cell border, where a position word would be a matter of opinion."""
    fx, fy = 3 * x / width, 3 * y / height
    col, row = cell_of(x, y, width, height)
    if min(fx - col, col + 1 - fx) < margin or min(fy - row, row + 1 - fy) < margin:
        return None
    return col, row


def cell_name(cell: tuple[int, int]) -> str:
    return _CELL_NAME[cell]


def where_phrase(cell: tuple[int, int]) -> str:
    """'in the top left', 'on the left', 'at the top', 'in the center'."""
    name = _CELL_NAME[cell]
    if name in ("left", "right"):
        return f"on the {name}"
    if name in ("top", "bottom"):
        return f"at the {name}"
    return f"in the {name}"


def object_cell(obj: Obj, scene: Scene) -> tuple[int, int]:
    return cell_of(obj.cx, obj.cy, scene.width, scene.height)


def clamp_centre(obj: Obj, width: int, height: int) -> Obj:
    """Moves the centre so the whole box lies inside the image."""
    cx = min(max(obj.cx, obj.w / 2), width - obj.w / 2)
    cy = min(max(obj.cy, obj.h / 2), height - obj.h / 2)
    return dataclasses.replace(obj, cx=cx, cy=cy)


def point_in_cell(rng: np.random.Generator, cell: tuple[int, int], width: int, height: int, margin: float = 0.15):
    """A random point well inside a grid cell (margin as a fraction of the cell)."""
    col, row = cell
    fx = (col + rng.uniform(margin, 1 - margin)) / 3
    fy = (row + rng.uniform(margin, 1 - margin)) / 3
    return fx * width, fy * height


# ---------------------------------------------------------------- rendering


def _star_points(w: int, h: int) -> list[tuple[float, float]]:
    cx, cy, pts = (w - 1) / 2, (h - 1) / 2, []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * (w - 1) / 2 * math.cos(a), cy + r * (h - 1) / 2 * math.sin(a)))
    return pts


def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of a shape filling a w x h box."""
    canvas = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(canvas)
    r, b = w - 1, h - 1
    if shape in ("square", "rectangle"):
        d.rectangle([0, 0, r, b], fill=1)
    elif shape in ("circle", "ellipse"):
        d.ellipse([0, 0, r, b], fill=1)
    elif shape == "ring":
        d.ellipse([0, 0, r, b], fill=1)
        d.ellipse([0.27 * r, 0.27 * b, 0.73 * r, 0.73 * b], fill=0)
    elif shape == "triangle":
        d.polygon([(r / 2, 0), (r, b), (0, b)], fill=1)
    elif shape == "diamond":
        d.polygon([(r / 2, 0), (r, b / 2), (r / 2, b), (0, b / 2)], fill=1)
    elif shape == "star":
        d.polygon(_star_points(w, h), fill=1)
    elif shape == "cross":
        d.rectangle([0, b / 3, r, 2 * b / 3], fill=1)
        d.rectangle([r / 3, 0, 2 * r / 3, b], fill=1)
    elif shape == "hexagon":
        d.polygon([(r / 4, 0), (3 * r / 4, 0), (r, b / 2), (3 * r / 4, b), (r / 4, b), (0, b / 2)], fill=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas, dtype=bool)


def _pattern(kind: str, h: int, w: int, param: int, seed: int) -> np.ndarray:
    """Per-pixel shade in [0, 1] (float32, (h, w)) for a texture; 1 = the base colour."""
    if kind == "solid":
        return np.ones((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "stripes":
        period = max(4, param)
        axis = (xx + yy) if seed % 3 == 0 else (xx if seed % 3 == 1 else yy)
        return np.where((axis // (period // 2)) % 2 == 0, 1.0, 0.6).astype(np.float32)
    if kind == "checker":
        cell = max(3, param)
        return np.where(((xx // cell) + (yy // cell)) % 2 == 0, 1.0, 0.65).astype(np.float32)
    if kind == "gradient":
        t = xx / max(1, w - 1) if param % 2 == 0 else yy / max(1, h - 1)
        return (0.6 + 0.4 * t).astype(np.float32)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(1.0 + 0.12 * rng.standard_normal((h, w), dtype=np.float32), 0.55, 1.3)
    raise ValueError(f"unknown texture {kind!r}")


def _fill(colour: tuple[int, int, int], kind: str, h: int, w: int, param: int, seed: int) -> np.ndarray:
    shade = _pattern(kind, h, w, param, seed)[..., None]
    return np.clip(np.asarray(colour, np.float32) * shade, 0, 255)


@functools.lru_cache(maxsize=16)
def render_background(bg: Background, width: int, height: int) -> np.ndarray:
    c1 = np.asarray(BACKGROUND_COLOURS[bg.colours[0]], np.float32)
    c2 = np.asarray(BACKGROUND_COLOURS[bg.colours[1]], np.float32)
    if bg.kind == "solid":
        img = np.broadcast_to(c1, (height, width, 3))
    elif bg.kind == "gradient":
        n = width if bg.param % 2 == 0 else height
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)
        t = t[None, :, None] if bg.param % 2 == 0 else t[:, None, None]
        img = np.broadcast_to(c1 * (1 - t) + c2 * t, (height, width, 3))
    elif bg.kind == "noise":
        rng = np.random.default_rng(bg.seed)
        img = c1 + 14.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    elif bg.kind == "stripes":
        half = max(3, bg.param // 2)
        yy, xx = np.mgrid[0:height, 0:width]
        axis = xx if bg.seed % 2 == 0 else yy
        img = np.where(((axis // half) % 2 == 0)[..., None], c1, c2)
    else:
        raise ValueError(f"unknown background {bg.kind!r}")
    out = np.clip(img, 0, 255).astype(np.uint8)
    out.flags.writeable = False  # cached: callers must copy
    return out


@functools.lru_cache(maxsize=512)
def _placed(obj: Obj, width: int, height: int):
    """(local mask, local fill, image slices) of an object, clipped to the image. Cached
    because an edit re-renders mostly the same objects several times."""
    x0, y0, x1, y1 = obj.box()
    w, h = x1 - x0, y1 - y0
    mask = shape_mask(obj.shape, w, h)
    fill = _fill(COLOURS[obj.colour], obj.texture, h, w, obj.tex_param, obj.tex_seed)
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    local = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    mask, pixels = mask[local], fill[local][mask[local]].astype(np.uint8)
    mask.flags.writeable = pixels.flags.writeable = False
    return mask, pixels, (slice(cy0, cy1), slice(cx0, cx1))


def render(scene: Scene) -> np.ndarray:
    """(H, W, 3) uint8 image: background, then objects in order (later ones on top)."""
    img = render_background(scene.background, scene.width, scene.height).copy()
    for obj in scene.objects:
        placed = _placed(obj, scene.width, scene.height)
        if placed is None:
            continue
        mask, pixels, sl = placed
        img[sl][mask] = pixels
    return img


def footprint(obj: Obj, width: int, height: int) -> np.ndarray:
    """Full-image boolean mask of an object ignoring occlusion."""
    out = np.zeros((height, width), bool)
    placed = _placed(obj, width, height)
    if placed is not None:
        mask, _, sl = placed
        out[sl] = mask
    return out


def visible_mask(scene: Scene, index: int) -> np.ndarray:
    """Pixels of object `index` not covered by objects drawn after it."""
    vis = footprint(scene.objects[index], scene.width, scene.height)
    for later in scene.objects[index + 1 :]:
        vis &= ~footprint(later, scene.width, scene.height)
    return vis


def background_mask(scene: Scene) -> np.ndarray:
    covered = np.zeros((scene.height, scene.width), bool)
    for obj in scene.objects:
        covered |= footprint(obj, scene.width, scene.height)
    return ~covered


def changed_mask(a: np.ndarray, b: np.ndarray, tol: int = CHANGE_TOL) -> np.ndarray:
    """Pixels where some channel differs by more than `tol`."""
    d = np.maximum(a, b) - np.minimum(a, b)
    # Channel-wise compares: numpy reduces a length-3 last axis slowly.
    return (d[..., 0] > tol) | (d[..., 1] > tol) | (d[..., 2] > tol)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the True pixels, end exclusive; None when empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def normalize_box(box_px: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (end exclusive) -> 0..1000 grid: starts floor, ends ceil, so the grid box
    always covers every pixel of the pixel box and x1 < x2 whenever the box is non-empty."""
    x0, y0, x1, y1 = box_px
    return (
        x0 * 1000 // width,
        y0 * 1000 // height,
        -(-x1 * 1000 // width),
        -(-y1 * 1000 // height),
    )


# ---------------------------------------------------------------- artifacts


def inject_artifact(img: np.ndarray, kind: str, severity: float, seed: int) -> np.ndarray:
    """Degrades `img` by a known amount. Severity 0..1; the same seed at a higher severity
    degrades strictly more (blur radius, noise sigma, blotch count/size/opacity, JPEG quality
    all move monotonically with it)."""
    if severity <= 0 or kind == "none":
        return img.copy()
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    if kind == "blur":
        radius = 0.4 + 2.6 * severity
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    if kind == "noise":
        sigma = 3.0 + 37.0 * severity
        noise = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if kind == "blotch":
        # Draw the maximal set of blotch parameters first so a severity change never
        # reshuffles where the blotches go.
        centres = rng.uniform(0, 1, (5, 2)) * (w, h)
        aspects = rng.uniform(0.6, 1.6, 5)
        colours = rng.integers(0, 256, (5, 3)).astype(np.float32)
        count = 1 + int(round(4 * severity))
        radius = (0.06 + 0.14 * severity) * min(w, h)
        alpha = 0.35 + 0.6 * severity
        out = img.astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        for (cx, cy), asp, col in zip(centres[:count], aspects[:count], colours[:count]):
            m = ((xx - cx) / (radius * asp)) ** 2 + ((yy - cy) / (radius / asp)) ** 2 <= 1.0
            out[m] = (1 - alpha) * out[m] + alpha * col
        return np.clip(out, 0, 255).astype(np.uint8)
    if kind == "jpeg":
        quality = max(2, int(round(70 - 66 * severity)))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    raise ValueError(f"unknown artifact {kind!r}")


def blotch_centre(severity: float, seed: int, width: int, height: int) -> tuple[float, float]:
    """Centre of the first blotch `inject_artifact` draws (for position words)."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0, 1, (5, 2))[0] * (width, height)
    return float(cx), float(cy)
