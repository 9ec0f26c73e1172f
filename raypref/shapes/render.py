"""Rendering scenes by the spec's geometry and palette (shared/shapes_world.md).

A pixel (x, y) is inside a shape when its centre (x + 0.5, y + 0.5) is. Objects are filled,
opaque, do not overlap (their bounding boxes keep a gap, so they stay separate components),
and stay inside the canvas with a 1 px margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypref.shapes.detect import passes
from raypref.shapes.grammar import BACKGROUND, COLORS, PALETTE, Obj, Scene

# Object size (circle radius, square half-side, triangle half-height) at 32 x 32: whole pixels
# with free (float) centres, the convention under which the spec's fill ratios hold (circles
# 0.73 to 0.93, triangles 0.54 to 0.60). The spec allows 3 to 7 px; renders default to the top of
# the range: a large square keeps its fill ratio >= 0.95 with a rounded corner pixel or two, which a
# small one does not, and the pretraining pilots drew squares more often on them (docs/results.md).
SIZE_RANGE = (6, 7)
MARGIN = 1.0
GAP = 2.0  # min distance between bounding boxes: keeps objects separate 4-connected components


@dataclass(frozen=True)
class Placed:
    """An object on the canvas: centre (cx, cy) and size r in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    r: float


def shape_mask(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> np.ndarray:
    """[H, W] bool: the pixels whose centres lie inside the shape."""
    y, x = np.mgrid[0:height, 0:width]
    px, py = x + 0.5, y + 0.5
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= r**2
    if shape == "square":
        return (np.abs(px - cx) <= r) & (np.abs(py - cy) <= r)
    if shape == "triangle":  # apex up: height 2r, base width 2r
        top = cy - r
        return (py >= top) & (py <= cy + r) & (np.abs(px - cx) <= (py - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def rasterize(objects: list[Placed], size: int = 32) -> np.ndarray:
    """[size, size, 3] uint8 image of the placed objects on the background."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        image[shape_mask(o.shape, o.cx, o.cy, o.r, size, size)] = PALETTE[o.color]
    return image


def _relation_ok(a: Placed, b: Placed, relation: str, slack: float) -> bool:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 2 + slack and along > abs(other) + slack


def layout(
    objects: tuple[Obj, ...] | list[Obj],
    rng: np.random.Generator,
    size: int = 32,
    size_range: tuple[int, int] = SIZE_RANGE,
    relation: str | None = None,
    max_tries: int = 400,
) -> list[Placed]:
    """Random non-overlapping placement; unnamed colours are drawn from the palette.

    With ``relation``, ``objects[0]`` is placed ``relation`` ``objects[1]``. Crowded scenes
    (four or five objects) shrink their sizes until they fit.
    """
    lo, hi = size_range
    if not (1 <= lo <= hi):
        raise ValueError(f"size_range must be whole pixels 1 <= lo <= hi, got {size_range}")
    scale = size / 32
    margin, gap = MARGIN * scale, GAP * scale
    colors = [o.color or COLORS[rng.integers(len(COLORS))] for o in objects]
    for attempt in range(max_tries):
        # shrink the upper size bound as attempts fail, never below the lower bound
        top = max(lo, round(hi - (hi - lo) * attempt / (max_tries / 2)))
        placed: list[Placed] = []
        for o, c in zip(objects, colors):
            r = int(rng.integers(lo, top + 1)) * scale
            low, high = margin + r, size - margin - r
            span = high - low
            for _ in range(50):
                # two uniform(low, high) draws, as numpy computes them (low + span * u), in one call:
                # the same stream and values, faster (crowded scenes try thousands of placements)
                u, v = rng.random(2).tolist()
                cx, cy = low + span * u, low + span * v
                for p in placed:
                    if max(abs(cx - p.cx), abs(cy - p.cy)) < r + p.r + gap:
                        break
                else:
                    placed.append(Placed(o.shape, c, cx, cy, r))
                    break
            else:
                break
        if len(placed) == len(objects) and (
            relation is None or _relation_ok(placed[0], placed[1], relation, slack=2 * scale)
        ):
            return placed
    raise RuntimeError(f"could not place {len(objects)} objects on a {size} px canvas")


def render(
    scene: Scene,
    rng: np.random.Generator,
    size: int = 32,
    size_range: tuple[int, int] = SIZE_RANGE,
    max_tries: int = 100,
) -> np.ndarray:
    """A correct render of ``scene``: [size, size, 3] uint8 that passes ShapesEval for its prompt."""
    for _ in range(max_tries):
        image = rasterize(layout(scene.objects, rng, size, size_range, scene.relation), size)
        if passes(scene, image):
            return image
    raise RuntimeError(f"no passing render of {scene.prompt!r} in {max_tries} tries")
