"""The ShapesEval detector and pass rules, literally as shared/shapes_world.md states them.

Detector: a pixel takes the nearest palette colour when its RGB Euclidean distance to it is
<= 60 (ties go to the earlier palette colour), and is background otherwise; 4-connected
components of foreground pixels with at least 6 pixels (at 32 x 32, scaled by area) are
objects. An object's shape comes from its fill ratio (pixels / bounding-box area): square
>= 0.95, circle in [0.68, 0.95), triangle < 0.68; its colour is its majority palette colour
(ties to the earlier palette colour); its position is its centroid (mean pixel coordinate).
"Largest" means most pixels, ties to the object found first in row-major scan order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raypref.shapes.grammar import CATEGORIES, COLORS, PALETTE, SHAPES, Scene, parse

PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)  # [8, 3]
COLOR_DISTANCE = 60.0
MIN_PIXELS_AT_32 = 6
MIN_OFFSET_AT_32 = 2.0
SQUARE_FILL = 0.95
CIRCLE_FILL = 0.68


@dataclass(frozen=True)
class Detection:
    """One detected object. ``cx, cy`` is the centroid in pixel units (x right, y down)."""

    shape: str
    color: str
    pixels: int
    cx: float
    cy: float
    fill: float
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W] int: palette index, or -1 for background."""
    image = _check_image(image)
    d2 = ((image[:, :, None, :].astype(np.float64) - PALETTE_RGB) ** 2).sum(-1)  # [H, W, 8]
    idx = d2.argmin(-1)  # argmin returns the first minimum: ties go to the earlier colour
    near = np.take_along_axis(d2, idx[..., None], -1)[..., 0] <= COLOR_DISTANCE**2
    return np.where(near, idx, -1)


def min_pixels(height: int, width: int) -> int:
    """The minimum component size: 6 at 32 x 32, scaled by image area."""
    return max(1, math.ceil(MIN_PIXELS_AT_32 * height * width / (32 * 32) - 1e-9))


def shape_of_fill(fill: float) -> str:
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return "triangle"


def components(labels: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``labels >= 0``, each an [N, 2] array of (y, x), in row-major
    order of their first pixel."""
    fg = labels >= 0
    h, w = fg.shape
    seen = np.zeros_like(fg)
    out = []
    for y0, x0 in zip(*np.nonzero(fg)):  # np.nonzero scans row-major
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pix = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pix.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pix))
    return out


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an [H, W, 3] uint8 image, in row-major order of their first pixel."""
    labels = classify_pixels(image)
    h, w = labels.shape
    found = []
    for pix in components(labels):
        if len(pix) < min_pixels(h, w):
            continue
        ys, xs = pix[:, 0], pix[:, 1]
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        fill = len(pix) / ((x1 - x0 + 1) * (y1 - y0 + 1))
        votes = np.bincount(labels[ys, xs], minlength=len(COLORS))
        found.append(
            Detection(
                shape=shape_of_fill(fill),
                color=COLORS[int(votes.argmax())],  # argmax: ties to the earlier colour
                pixels=len(pix),
                cx=float(xs.mean()),
                cy=float(ys.mean()),
                fill=fill,
                bbox=(x0, y0, x1, y1),
            )
        )
    return found


def _largest(objs: list[Detection], shape: str) -> Detection | None:
    best = None
    for o in objs:
        if o.shape == shape and (best is None or o.pixels > best.pixels):
            best = o
    return best


def relation_holds(a: Detection, b: Detection, relation: str, min_offset: float = MIN_OFFSET_AT_32) -> bool:
    """Whether ``a`` is ``relation`` ``b`` by the spec's centroid rule."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # offsets of b from a
    along, other = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along >= min_offset and along > abs(other)


PRESENT_QUESTION = "is there a {}?"  # every prompt asks it of each shape it names


def checks(scene: Scene) -> list[tuple[str, callable]]:
    """The prompt's constraints as (yes/no question, predicate over detections), DSG-style.

    An image passes ShapesEval exactly when every predicate holds; the faithfulness score is the
    fraction that hold; the judge asks the questions.
    """
    objs = scene.objects
    present = [
        (PRESENT_QUESTION.format(s), lambda d, s=s: any(o.shape == s for o in d))
        for s in dict.fromkeys(o.shape for o in objs)
    ]
    if scene.category in ("single_object", "two_object"):
        return present
    if scene.category == "counting":
        s, n = objs[0].shape, len(objs)
        return present + [
            (f"are there exactly {n} {s}s?", lambda d: sum(o.shape == s for o in d) == n)
        ]
    if scene.category == "colors":
        s, c = objs[0].shape, objs[0].color
        return present + [
            (f"is the {s} {c}?", lambda d: (o := _largest(d, s)) is not None and o.color == c)
        ]
    if scene.category == "position":
        a, b, rel = objs[0].shape, objs[1].shape, scene.relation

        def rel_ok(d, min_offset=MIN_OFFSET_AT_32):
            oa, ob = _largest(d, a), _largest(d, b)
            return oa is not None and ob is not None and relation_holds(oa, ob, rel, min_offset)

        return present + [(f"is the {a} {rel} the {b}?", rel_ok)]
    if scene.category == "color_attr":
        return present + [
            (f"is there a {o.color} {o.shape}?",
             lambda d, o=o: any(x.shape == o.shape and x.color == o.color for x in d))
            for o in objs
        ]
    raise ValueError(f"unknown category {scene.category!r}")


def _scaled_checks(scene: Scene, height: int):
    # The 2 px position offset is stated at 32 x 32; scale it with the canvas.
    out = checks(scene)
    if scene.category == "position" and height != 32:
        q, fn = out[-1]
        out[-1] = (q, lambda d, fn=fn: fn(d, MIN_OFFSET_AT_32 * height / 32))
    return out


def check_results(prompt: str | Scene, image: np.ndarray) -> list[tuple[str, bool]]:
    """(question, holds) for each of the prompt's constraints on ``image``."""
    scene = parse(prompt) if isinstance(prompt, str) else prompt
    image = _check_image(image)
    found = detect(image)
    return [(q, bool(fn(found))) for q, fn in _scaled_checks(scene, image.shape[0])]


def passes(prompt: str | Scene, image: np.ndarray) -> bool:
    """ShapesEval's pass/fail of one image for its prompt."""
    return all(ok for _, ok in check_results(prompt, image))


def shapes_eval(prompts: list[str], images) -> dict:
    """ShapesEval over (prompt, image) pairs: {"categories": {cat: score}, "overall": mean of
    the categories present, "n": count, "passed": [bool per image], "shapes": {shape: fraction of
    the prompts naming that shape whose image has one}} (a diagnostic beside the score: a shape the
    model cannot draw fails every category that names it)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    results = [check_results(p, im) for p, im in zip(prompts, images)]
    passed = [all(ok for _, ok in r) for r in results]
    per_cat: dict[str, list[bool]] = {}
    drawn: dict[str, list[bool]] = {}
    for p, r, ok in zip(prompts, results, passed):
        scene = parse(p)
        per_cat.setdefault(scene.category, []).append(ok)
        answers = dict(r)
        for shape in dict.fromkeys(o.shape for o in scene.objects):
            drawn.setdefault(shape, []).append(answers[PRESENT_QUESTION.format(shape)])
    cats = {c: float(np.mean(per_cat[c])) for c in CATEGORIES if c in per_cat}
    return {
        "categories": cats,
        "overall": float(np.mean(list(cats.values()))) if cats else float("nan"),
        "n": len(prompts),
        "passed": passed,
        "shapes": {s: float(np.mean(drawn[s])) for s in SHAPES if s in drawn},
    }


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 image, got shape {image.shape} dtype {image.dtype}")
    return image
