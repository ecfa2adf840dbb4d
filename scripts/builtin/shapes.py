"""The built-in model's world: coloured shapes on a plain background, their captions, and a detector.

A scene is 1-3 objects on one grey background, each a circle, square or triangle in red, green, blue or
yellow, no two alike, of random size and position and never touching. Its caption names every object as
``a <colour> <shape>``, joined by `` and `` in random order: ``a red circle and a blue square``.

The detector reads any 128x128 image of this world (a rendered scene or a generated one): every pixel goes
to the nearest palette colour if it is close enough to one, each object colour is split into connected
components, and each component large enough to be an object gets a shape from how much of its bounding box
it fills (square 1, circle π/4, triangle 1/2). Training (`scripts/builtin/train.py`) and the benchmarks
(`scripts/bench/layout_bench.py`) use this module; the library does not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

SIZE = 128
BACKGROUND = (128, 128, 128)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
OBJECT_SIZES = (28, 46)  # side of an object's bounding box in pixels, inclusive range
GAP = 6  # pixels kept free between two objects' boxes

# Detector thresholds.
MAX_COLOUR_DISTANCE = 100.0  # RGB distance under which a pixel takes its nearest palette colour
MIN_AREA = 80  # pixels; smaller components are specks, not objects
FILL_SQUARE = 0.89  # fill of the bounding box above this: square (1.0); between: circle (0.785)
FILL_TRIANGLE = 0.64  # below this: triangle (0.5)


@dataclass(frozen=True)
class Thing:
    """One object of a scene: what it is and the pixel box it is drawn in, [x0, x1) × [y0, y1)."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def phrase(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]  # in caption order

    @property
    def caption(self) -> str:
        return caption(self.things)


def caption(things) -> str:
    return " and ".join(t.phrase for t in things)


def all_kinds() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def shape_mask(shape: str, box: tuple[int, int, int, int], size: int = SIZE) -> np.ndarray:
    """(size, size) bool: the shape drawn in `box`, sampled at pixel centres."""
    x0, y0, x1, y1 = box
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    w, h = x1 - x0, y1 - y0
    if shape == "square":
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if shape == "circle":
        cx, cy, r = x0 + w / 2, y0 + h / 2, min(w, h) / 2
        return (xs - cx) ** 2 + (ys - cy) ** 2 < r**2
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        u = (ys - y0) / h  # 0 at the apex row, 1 at the base
        half = u * w / 2
        cx = x0 + w / 2
        return (u >= 0) & (u < 1) & (np.abs(xs - cx) < half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) uint8 image of the scene, hard edges."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for t in scene.things:
        image[shape_mask(t.shape, t.box, size)] = COLOURS[t.colour]
    return image


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place(rng: random.Random, sides: list[int], size: int = SIZE, taken=()) -> list[tuple[int, int, int, int]] | None:
    """Random non-touching square boxes of the given sides (None when 200 tries fail)."""
    boxes = list(taken)
    out = []
    for side in sides:
        for _ in range(200):
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlaps(box, b, GAP) for b in boxes):
                boxes.append(box)
                out.append(box)
                break
        else:
            return None
    return out


def random_scene(rng: random.Random, count: int | None = None, size: int = SIZE) -> Scene:
    """A random scene of `count` (default 1-3, uniform) distinct objects, listed in random caption order."""
    count = count or rng.randint(1, 3)
    while True:
        kinds = rng.sample(all_kinds(), count)
        boxes = place(rng, [rng.randint(*OBJECT_SIZES) for _ in kinds], size)
        if boxes is not None:
            return Scene(tuple(Thing(c, s, b) for (c, s), b in zip(kinds, boxes)))


# ----------------------------------------------------------------------------------------------------------
# The detector


@dataclass(frozen=True, eq=False)
class Detection:
    colour: str
    shape: str
    centroid: tuple[float, float]  # (x, y) in pixels
    box: tuple[int, int, int, int]  # [x0, x1) × [y0, y1)
    mask: np.ndarray  # (H, W) bool
    fill: float  # area / box area

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's nearest palette colour, -1 for background or unknown."""
    palette = np.array([BACKGROUND, *COLOURS.values()], np.float32)  # (1+C, 3)
    d = np.linalg.norm(image[:, :, None, :].astype(np.float32) - palette, axis=-1)  # (H, W, 1+C)
    nearest = d.argmin(-1)
    close = d.min(-1) < MAX_COLOUR_DISTANCE
    return np.where(close & (nearest > 0), nearest - 1, -1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a bool mask, each as a bool mask (label propagation, vectorised)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:  # every pixel takes the smallest label among itself and its masked neighbours
        padded = np.pad(labels, 1, constant_values=big)
        low = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        low = np.where(mask, low, big)
        if np.array_equal(low, labels):
            break
        labels = low
    return [labels == v for v in np.unique(labels[mask])]


def classify(fill: float) -> str:
    if fill >= FILL_SQUARE:
        return "square"
    return "circle" if fill >= FILL_TRIANGLE else "triangle"


def detect(image: np.ndarray) -> list[Detection]:
    """Every object in an (H, W, 3) uint8 image of the shapes world, largest first."""
    labels = colour_labels(image)
    found = []
    for index, colour in enumerate(COLOURS):
        for comp in components(labels == index):
            area = int(comp.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(comp)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            fill = area / ((box[2] - box[0]) * (box[3] - box[1]))
            found.append(Detection(colour, classify(fill), (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5),
                                   box, comp, fill))
    return sorted(found, key=lambda d: -d.area)


def find(detections: list[Detection], colour: str, shape: str) -> Detection | None:
    """The largest detection of that colour and shape, if any."""
    return next((d for d in detections if d.colour == colour and d.shape == shape), None)


def named_kinds(text: str) -> list[tuple[str, str]]:
    """(colour, shape) of every object a caption names: 'a red circle and a blue square'."""
    kinds = []
    for part in text.split(" and "):
        words = part.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"not a caption of the shapes world: {text!r} (expected 'a <colour> <shape> and ...')")
        kinds.append((words[1], words[2]))
    return kinds


@dataclass(frozen=True)
class Judgement:
    """What a caption asked for against what the detector saw."""

    present: tuple[bool, ...]  # per named object: found with the right colour and shape
    unnamed: int  # detected objects that no named object accounts for

    @property
    def all_present(self) -> bool:
        return all(self.present)


def judge(image: np.ndarray, text: str) -> Judgement:
    detections = detect(image)
    named = named_kinds(text)
    present = tuple(find(detections, c, s) is not None for c, s in named)
    unnamed = len(detections) - sum(present)
    return Judgement(present, unnamed)


def centroid_in_box(d: Detection, box: tuple[float, float, float, float], size: int = SIZE) -> bool:
    """Is the detection's centroid inside a box given as fractions [x0, y0, x1, y1]?"""
    x, y = d.centroid[0] / size, d.centroid[1] / size
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def fill_of(shape: str) -> float:
    """The ideal fill ratio of a shape (for documentation and tests)."""
    return {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}[shape]
