"""Procedural teachers: the shapes world's "advanced T2I models behind paid APIs".

Each teacher has a skill profile: per category, the probability that it gets the prompt wrong
in a category-appropriate way (wrong or missing shape, wrong count, wrong colour, wrong
relation, wrong colour binding), plus visual defects that cost aesthetics but never change
whether the image passes (blur, speckle noise, jittered colours), and a cost per call.

A profile's numbers mean what they say: every render is checked by the detector, so an image
meant to pass passes and an image meant to fail fails, and the designed ShapesEval pass rate of
category c is ``1 - error[c]``. The error draw uses a quasi-random (Weyl) sequence over the seed,
so over consecutive seeds the measured rate converges like 1/n rather than 1/sqrt(n).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from raypref.shapes.detect import passes
from raypref.shapes.grammar import CATEGORIES, COLORS, RELATIONS, SHAPES, Obj, Scene, parse, sample_prompts
from raypref.shapes.render import SIZE_RANGE, layout, rasterize

_GOLDEN = 0.6180339887498949


@dataclass(frozen=True)
class SkillProfile:
    """What a teacher gets wrong. ``error[c]`` is the probability of a prompt error in category c."""

    error: dict[str, float]
    blur: float = 0.0  # probability of a blurred image
    speckle: float = 0.0  # probability of isolated noise pixels
    jitter: float = 0.0  # std of a per-object colour shift, in RGB units
    cost: float = 1.0  # cost per call (arbitrary currency)

    def __post_init__(self):
        unknown = set(self.error) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories in skill profile: {sorted(unknown)}")
        for c, p in self.error.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"error probability for {c} must be in [0, 1], got {p}")
        if not (0 <= self.blur <= 1 and 0 <= self.speckle <= 1 and self.jitter >= 0 and self.cost >= 0):
            raise ValueError(f"invalid defect settings in {self}")

    def pass_rate(self, category: str) -> float:
        """The ShapesEval pass rate this profile is designed to give in ``category``."""
        return 1.0 - self.error.get(category, 0.0)


def _profile(single, two, counting, colors, position, color_attr, **kw) -> SkillProfile:
    return SkillProfile(dict(zip(CATEGORIES, (single, two, counting, colors, position, color_attr))), **kw)


# None is best everywhere (EvolveDirector's teachers differ by category).
PROFILES = {
    "clean": _profile(0, 0, 0, 0, 0, 0, cost=0.0),
    "prism": _profile(0.05, 0.15, 0.55, 0.05, 0.60, 0.20, cost=1.0),  # colours; weak at layout
    "quill": _profile(0.05, 0.10, 0.10, 0.45, 0.15, 0.60, speckle=0.3, cost=1.0),  # layout; weak at colour
    "vellum": _profile(0.10, 0.25, 0.35, 0.25, 0.35, 0.35, blur=0.5, cost=0.5),  # cheap generalist
    "zephyr": _profile(0.20, 0.40, 0.30, 0.20, 0.10, 0.10, jitter=14.0, cost=2.0),  # composition
    # Not a paid teacher: the base model's own pretraining data, clean renders whose captions are wrong
    # as web alt-text often is (colours, counts, colour bindings), so the base model learns the
    # prompt-following errors that preference alignment exists to remove. Shapes are always right.
    "web": _profile(0, 0, 0.30, 0.50, 0, 0.50, cost=0.0),
}


def _unit(*parts) -> float:
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def wrong_scene(scene: Scene, rng: np.random.Generator) -> tuple[list[Obj], str | None]:
    """A category-appropriate mistake: objects (and relation) that should fail ``scene``."""
    objs, cat = list(scene.objects), scene.category
    other = lambda s: [x for x in SHAPES if x != s][rng.integers(len(SHAPES) - 1)]  # noqa: E731
    if cat == "single_object":  # wrong shape, or nothing drawn
        return ([Obj(other(objs[0].shape))] if rng.random() < 0.8 else []), None
    if cat == "two_object":  # one of the two replaced by a third shape or dropped
        k = int(rng.integers(2))
        keep = objs[1 - k]
        third = [s for s in SHAPES if s not in (objs[0].shape, objs[1].shape)][0]
        return ([keep, Obj(third)] if rng.random() < 0.5 else [keep]), None
    if cat == "counting":  # off by one
        n = len(objs) + (1 if rng.random() < 0.5 else -1)
        return [objs[0]] * n, None
    if cat == "colors":  # wrong colour
        o = objs[0]
        return [Obj(o.shape, [c for c in COLORS if c != o.color][rng.integers(len(COLORS) - 1)])], None
    if cat == "position":  # another relation
        return objs, [r for r in RELATIONS if r != scene.relation][rng.integers(len(RELATIONS) - 1)]
    if cat == "color_attr":  # colours swapped between the objects, or one colour wrong
        a, b = objs
        if rng.random() < 0.5:
            return [Obj(a.shape, b.color), Obj(b.shape, a.color)], None
        wrong = [c for c in COLORS if c not in (a.color, b.color)][rng.integers(len(COLORS) - 2)]
        return [Obj(a.shape, wrong), b] if rng.random() < 0.5 else [a, Obj(b.shape, wrong)], None
    raise ValueError(f"unknown category {cat!r}")


def _defects(image: np.ndarray, profile: SkillProfile, rng: np.random.Generator) -> np.ndarray:
    img = image.astype(np.float32)
    if profile.jitter > 0:
        fg = np.any(image != image[0, 0], axis=-1)  # corners are background: objects keep a margin
        img[fg] += rng.normal(0, profile.jitter, size=3)
    if rng.random() < profile.blur:  # soften edges: mix each pixel with its 4-neighbourhood mean
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        neigh = (pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]) / 4
        img = 0.5 * img + 0.5 * neigh
    if rng.random() < profile.speckle:  # a few isolated noise pixels
        h, w, _ = img.shape
        n = int(rng.integers(4, 12)) * h * w // 1024
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        img[ys, xs] = rng.integers(0, 256, size=(n, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass
class Teacher:
    """A procedural teacher: ``generate(prompts, seeds)`` -> [B, H, W, 3] uint8, counted and costed.

    The same (prompt, seed) always gives the same image. Also a batch-dict callable
    ({"prompt", "seed"} -> adds "image"), so it runs in Ray Data's ``map_batches``.
    """

    name: str
    profile: SkillProfile = None
    size: int = 32
    size_range: tuple[int, int] = SIZE_RANGE
    calls: int = field(default=0, init=False)
    cost: float = field(default=0.0, init=False)

    def __post_init__(self):
        if self.profile is None:
            if self.name not in PROFILES:
                raise ValueError(f"unknown teacher {self.name!r}; known: {', '.join(PROFILES)}")
            self.profile = PROFILES[self.name]

    def means_error(self, scene: Scene, seed: int) -> bool:
        """Whether the call (prompt, seed) is one of this teacher's mistakes (Weyl sequence over seeds)."""
        u = (_unit(self.name, scene.category) + _GOLDEN * seed) % 1.0
        return u < self.profile.error.get(scene.category, 0.0)

    def render_one(self, prompt: str, seed: int, max_tries: int = 200) -> np.ndarray:
        scene = parse(prompt)
        rng = np.random.default_rng([int(seed) & (2**63 - 1), int(_unit(self.name, prompt) * 2**32)])
        want_pass = not self.means_error(scene, seed)
        for _ in range(max_tries):
            objs, rel = (scene.objects, scene.relation) if want_pass else wrong_scene(scene, rng)
            try:
                image = rasterize(layout(objs, rng, self.size, self.size_range, rel), self.size)
            except RuntimeError:
                continue
            image = _defects(image, self.profile, rng)
            if passes(scene, image) == want_pass:
                return image
        raise RuntimeError(
            f"teacher {self.name} found no {'passing' if want_pass else 'failing'} render of {prompt!r}"
        )

    def generate(self, prompts, seeds) -> np.ndarray:
        """[B] prompts and seeds -> [B, H, W, 3] uint8; each call counted and costed."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images = np.stack([self.render_one(str(p), int(s)) for p, s in zip(prompts, seeds)]) if len(prompts) else (
            np.zeros((0, self.size, self.size, 3), np.uint8))
        self.calls += len(prompts)
        self.cost += len(prompts) * self.profile.cost
        return images

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        out["image"] = self.generate(list(batch["prompt"]), list(batch["seed"]))
        return out


def render_pool(teacher: str, n: int, resolution: int, size_range, seed: int) -> tuple[list[str], np.ndarray]:
    """n (prompt, image) pairs from a teacher, categories balanced: ([n] prompts, [n, H, W, 3] uint8)."""
    from raypref.shapes.teachers import Teacher

    per_cat = math.ceil(n / len(CATEGORIES))
    prompts = [p for c in CATEGORIES for p in sample_prompts(c, per_cat, seed)]
    order = np.random.default_rng(seed).permutation(len(prompts))[:n]
    prompts = [prompts[i] for i in order]
    t = Teacher(teacher, size=resolution, size_range=tuple(size_range))
    images = t.generate(prompts, [seed * 10_000_019 + i for i in range(n)])
    return prompts, images
