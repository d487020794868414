"""A procedural data set of captioned scenes for the trained tiny models (issue 17).

Every scene is a deterministic function of ``(seed, index)``: coloured shapes (circle, square,
triangle) of two sizes at jittered positions, sometimes overlapping, on a textured neutral
background (plain, striped, checkered, dotted). Nothing is stored: scenes are drawn on the fly.

Two kinds of scene:

- ``pair`` (text-to-image, Infinity): two shapes of different colours in a spatial relation, and a
  caption that says so: "a small red circle left of a large blue square on a striped background".
  The relation decides which half of the image each shape's centre lies in (centres 0.2-0.4 of
  the side from the edge along the relation's axis, in the middle 40 % across it; large shapes may
  overlap across the middle line). Pair shapes are larger than single ones (radius 0.13-0.16 /
  0.20-0.24 of the side vs 0.09-0.12 / 0.17-0.21), so each fills much of its half and the coarse
  token maps carry its colour: with the earlier single-scene sizes and free positions the tiny
  text-to-image model never learned where to put the colours.
- ``single`` (class-conditional, VAR): one shape; the class label is ``colour * 3 + kind``
  (6 colours x 3 kinds = 18 classes), e.g. class 4 = "green square".

``check_pair`` / ``check_single`` are the depiction checks used on generated images: a pixel
counts for a palette colour when it is saturated and nearest to that colour; the caption's colour
must dominate the half where the caption puts the shape (pair) or the whole image (single), and
for single scenes the shape kind is read off how much of its colour's bounding box the colour fills
(square ~1, circle ~pi/4, triangle ~1/2). Backgrounds are neutral (grey levels), so they never
count as a palette colour.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import attrs
import numpy as np

# Saturated, well separated hues; backgrounds stay grey so they never match one of these.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 205),
    "cyan": (40, 200, 215),
}
COLOURS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUNDS = ("plain", "striped", "checkered", "dotted")
RELATIONS = ("left of", "right of", "above", "below")
NUM_CLASSES = len(COLOURS) * len(KINDS)
# Every word a caption uses (the trained text encoder's word tokenizer gives each one id).
VOCABULARY = ("a", "on", "background", "of", "left", "right", "above", "below") + SIZES + COLOURS + KINDS + BACKGROUNDS
# Fill of the bounding box per kind (ideal shapes), for reading a kind off a colour mask.
KIND_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


def class_name(label: int) -> str:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class label must be an int in 0..{NUM_CLASSES - 1}, got {label!r}")
    colour, kind = divmod(int(label), len(KINDS))
    return f"{COLOURS[colour]} {KINDS[kind]}"


def class_label(colour: str, kind: str) -> int:
    return COLOURS.index(colour) * len(KINDS) + KINDS.index(kind)


@attrs.frozen
class Shape:
    kind: str
    colour: str
    size: str
    cy: float  # centre, in units of the image side (0..1)
    cx: float
    radius: float  # half the side of the bounding box, in units of the image side


@attrs.frozen
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    relation: Optional[str]  # pair scenes: how shapes[0] stands to shapes[1]
    caption: str
    label: Optional[int]  # single scenes: colour * 3 + kind


def _radius(size: str, rng: np.random.Generator) -> float:
    return float(rng.uniform(0.09, 0.12) if size == "small" else rng.uniform(0.17, 0.21))


def _pair_radius(size: str, rng: np.random.Generator) -> float:
    """Pair scenes draw larger shapes than single ones: each shape then fills much of its half, so the
    coarse 2x2 and 4x4 token maps (where a next-scale model decides the layout) carry its colour."""
    return float(rng.uniform(0.13, 0.16) if size == "small" else rng.uniform(0.2, 0.24))


# How pair scenes place their shapes: "halves" (the default, see the module docstring) or "free", the
# first layout (single-scene sizes, centres 0.12-0.45 of the side along the axis, anywhere across it),
# kept because var-tiny's VQ tokenizer trained on it: ``kvpolicy train-tiny`` still reproduces it.
PAIR_LAYOUTS = ("halves", "free")


def sample_scene(seed: int, index: int, kind: str = "pair", layout: str = "halves") -> Scene:
    """The scene number ``index`` of the stream ``seed`` (independent of every other index); ``layout``:
    one of ``PAIR_LAYOUTS`` (pair scenes; both draw the same captions)."""
    if kind not in ("pair", "single"):
        raise ValueError(f"scene kind must be 'pair' or 'single', got {kind!r}")
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"pair layout must be one of {PAIR_LAYOUTS}, got {layout!r}")
    rng = np.random.default_rng([int(seed), int(index), 0 if kind == "pair" else 1])
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if kind == "single":
        colour, shape_kind, size = COLOURS[rng.integers(6)], KINDS[rng.integers(3)], SIZES[rng.integers(2)]
        r = _radius(size, rng)
        cy, cx = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        shape = Shape(shape_kind, colour, size, float(cy), float(cx), r)
        caption = f"a {size} {colour} {shape_kind} on a {background} background"
        return Scene((shape,), background, None, caption, class_label(colour, shape_kind))
    colours = rng.choice(len(COLOURS), size=2, replace=False)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    shapes = []
    for i in range(2):
        size, shape_kind = SIZES[rng.integers(2)], KINDS[rng.integers(3)]
        r = _pair_radius(size, rng) if layout == "halves" else _radius(size, rng)
        # first shape: on the relation's side; the second on the other. Centres stay in their half
        # along the relation's axis (large shapes may overlap across the middle line) and, in the
        # "halves" layout, in the middle 40 % across it.
        first_side = relation in ("left of", "above")
        low_half = first_side if i == 0 else not first_side
        if layout == "halves":
            along = rng.uniform(0.2, 0.4) if low_half else rng.uniform(0.6, 0.8)
            across = rng.uniform(0.3, 0.7)
        else:
            along = rng.uniform(0.12, 0.45) if low_half else rng.uniform(0.55, 0.88)
            across = rng.uniform(r + 0.02, 1 - r - 0.02)
        cy, cx = (along, across) if relation in ("above", "below") else (across, along)
        shapes.append(Shape(shape_kind, COLOURS[colours[i]], size, float(cy), float(cx), r))
    a, b = shapes
    caption = f"a {a.size} {a.colour} {a.kind} {relation} a {b.size} {b.colour} {b.kind} on a {background} background"
    return Scene(tuple(shapes), background, relation, caption, None)


def _background(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    light, dark = rng.uniform(150, 225), rng.uniform(40, 110)
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(4, side // 4)
    if name == "plain":
        field = np.full((side, side), rng.uniform(60, 200))
    elif name == "striped":
        field = np.where((yy // (period // 2)) % 2 == 0, light, dark)
        if rng.integers(2):
            field = field.T
    elif name == "checkered":
        field = np.where(((yy // period) + (xx // period)) % 2 == 0, light, dark)
    else:  # dotted
        cy, cx = (yy % period) - period / 2 + 0.5, (xx % period) - period / 2 + 0.5
        field = np.where(cy * cy + cx * cx <= (period / 4) ** 2, light, dark)
    return np.repeat(field[..., None], 3, axis=2)


def _mask(shape: Shape, side: int) -> np.ndarray:
    """Coverage of ``shape`` on a ``side`` grid (2x2 supersampled: soft edges)."""
    fine = 2 * side
    coords = (np.arange(fine) + 0.5) / fine
    y, x = coords[:, None], coords[None, :]
    dy, dx, r = y - shape.cy, x - shape.cx, shape.radius
    if shape.kind == "circle":
        inside = dy * dy + dx * dx <= r * r
    elif shape.kind == "square":
        inside = (np.abs(dy) <= r * 0.9) & (np.abs(dx) <= r * 0.9)
    else:  # triangle, apex up: below the two slanted edges, above the base
        inside = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    return inside.reshape(side, 2, side, 2).mean(axis=(1, 3))


def render(scene: Scene, side: int = 64, seed: int = 0) -> np.ndarray:
    """(side, side, 3) uint8 RGB; shapes drawn in order (the second may cover the first)."""
    rng = np.random.default_rng([int(seed), len(scene.caption), int(scene.shapes[0].cx * 1e6)])
    image = _background(scene.background, side, rng)
    for shape in scene.shapes:
        coverage = _mask(shape, side)[..., None]
        image = image * (1 - coverage) + np.array(PALETTE[shape.colour], dtype=float) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def batch(seed: int, start: int, count: int, kind: str = "pair", side: int = 64, layout: str = "halves"):
    """Scenes ``start .. start+count-1`` of stream ``seed``: (images (N, side, side, 3) uint8, scenes)."""
    scenes = [sample_scene(seed, i, kind, layout) for i in range(start, start + count)]
    images = np.stack([render(s, side, seed * 1_000_003 + i) for s, i in zip(scenes, range(start, start + count))])
    return images, scenes


# -- depiction checks --------------------------------------------------------------------------------

def colour_map(image: np.ndarray, min_saturation: float = 0.35, max_distance: float = 110.0) -> np.ndarray:
    """Per pixel, the index of the nearest palette colour, or -1 (unsaturated or far from all)."""
    pixels = np.asarray(image, dtype=float)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got {pixels.shape}")
    top, bottom = pixels.max(-1), pixels.min(-1)
    saturation = (top - bottom) / np.maximum(top, 1.0)
    palette = np.array(list(PALETTE.values()), dtype=float)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)
    nearest = distance.argmin(-1)
    ok = (saturation >= min_saturation) & (distance.min(-1) <= max_distance)
    return np.where(ok, nearest, -1)


def dominant_colour(labels: np.ndarray) -> Optional[str]:
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(COLOURS))
    return COLOURS[int(counts.argmax())] if counts.sum() else None


def region(relation: str, first: bool, side: int) -> tuple[slice, slice]:
    """The half of the image where the caption puts the first (or second) shape's centre."""
    low = (relation in ("left of", "above")) == first
    half = slice(0, side // 2) if low else slice(side // 2, side)
    whole = slice(0, side)
    return (half, whole) if relation in ("above", "below") else (whole, half)


def check_pair(image: np.ndarray, scene: Scene) -> tuple[bool, bool]:
    """(first shape's colour dominates its half, second shape's colour dominates the other half)."""
    labels = colour_map(image)
    out = []
    for i, shape in enumerate(scene.shapes):
        rows, cols = region(scene.relation, i == 0, labels.shape[0])
        out.append(dominant_colour(labels[rows, cols]) == shape.colour)
    return out[0], out[1]


def _pattern_templates(side: int) -> dict:
    """The patterned backgrounds' light/dark layouts as ``_background`` draws them (both stripe
    orientations)."""
    yy, xx = np.mgrid[0:side, 0:side]
    period = max(4, side // 4)
    striped = ((yy // (period // 2)) % 2 == 0).astype(float)
    checkered = (((yy // period) + (xx // period)) % 2 == 0).astype(float)
    cy, cx = (yy % period) - period / 2 + 0.5, (xx % period) - period / 2 + 0.5
    dotted = (cy * cy + cx * cx <= (period / 4) ** 2).astype(float)
    return {"striped": (striped, striped.T), "checkered": (checkered,), "dotted": (dotted,)}


def background_kind(image: np.ndarray) -> Optional[str]:
    """Which of BACKGROUNDS an image's grey pixels show: 'plain' when they barely vary, else the
    pattern whose layout correlates best with them (shape pixels, which are coloured, are left out);
    None when fewer than a quarter of the pixels are grey."""
    pixels = image.astype(float)
    side = pixels.shape[0]
    grey = pixels.mean(axis=2)
    background = (pixels.max(axis=2) - pixels.min(axis=2)) < 40
    if background.sum() < side * side // 4:
        return None
    values = grey[background] - grey[background].mean()
    if values.std() < 12:
        return "plain"
    best, kind = -1.0, None
    for name, layouts in _pattern_templates(side).items():
        for layout in layouts:
            t = layout[background] - layout[background].mean()
            corr = abs((values * t).sum()) / (np.sqrt((values * values).sum() * (t * t).sum()) + 1e-9)
            if corr > best:
                best, kind = corr, name
    return kind


def check_background(image: np.ndarray, scene: Scene) -> bool:
    """The image shows the background its caption names."""
    return background_kind(image) == scene.background


def read_kind(mask: np.ndarray) -> Optional[str]:
    """The kind whose ideal bounding-box fill is nearest to the mask's (None for an empty mask)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return None
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    return min(KIND_FILL, key=lambda k: abs(KIND_FILL[k] - fill))


def check_single(image: np.ndarray, label: int) -> tuple[bool, bool]:
    """(the class's colour dominates the image, the dominant colour's mask reads as the class's kind)."""
    colour, kind = class_name(label).split(" ")
    labels = colour_map(image)
    dominant = dominant_colour(labels)
    if dominant is None:
        return False, False
    return dominant == colour, read_kind(labels == COLOURS.index(dominant)) == kind


def held_out_seed(seed: int) -> int:
    """The evaluation stream for a training seed: disjoint from training (different stream key)."""
    return 1_000_000 + int(seed)


def captions(seed: int, count: int, start: int = 0) -> list[str]:
    return [sample_scene(seed, i).caption for i in range(start, start + count)]


def scene_for_caption(caption: str, pool: Sequence[Scene]) -> Scene:
    for scene in pool:
        if scene.caption == caption:
            return scene
    raise KeyError(caption)
