"""The shapes world's prompt grammar (shared/shapes_world.md): six GenEval-style categories.

A prompt parses into a :class:`Scene`: the objects it asks for (shape, colour or None) and, for
``position``, the relation of the first object to the second. Text outside the grammar is an
error, never a guess.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle")
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 200, 210),
}
COLORS = tuple(PALETTE)
BACKGROUND = (24, 24, 24)
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Every word the grammar can emit; the tokenizer's vocabulary is built from it.
VOCAB = tuple(
    dict.fromkeys(
        ["a", "and", "left", "right", "of", "above", "below", *SHAPES, *(s + "s" for s in SHAPES),
         *COLORS, *NUMBERS]
    )
)


@dataclass(frozen=True)
class Obj:
    """One requested object: a shape and, where the prompt names one, a colour."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for.

    ``objects`` lists every requested object (a counting prompt repeats its object N times);
    ``relation`` is, for ``position``, where ``objects[0]`` stands relative to ``objects[1]``.
    """

    prompt: str
    category: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)


class GrammarError(ValueError):
    """Input outside the shapes world's grammar (a prompt, or a question the shapes judge does not ask):
    the caller's mistake, safe to show to a client."""


def _error(prompt: str, why: str) -> ValueError:
    return GrammarError(f"prompt {prompt!r} is not in the shapes grammar: {why}")


def _shape(prompt: str, word: str) -> str:
    if word not in SHAPES:
        raise _error(prompt, f"{word!r} is not a shape (expected one of {', '.join(SHAPES)})")
    return word


def _color(prompt: str, word: str) -> str:
    if word not in PALETTE:
        raise _error(prompt, f"{word!r} is not a palette colour (expected one of {', '.join(COLORS)})")
    return word


def _noun_phrase(prompt: str, words: list[str]) -> Obj:
    """``a {shape}`` or ``a {color} {shape}``."""
    if len(words) == 2 and words[0] == "a":
        return Obj(_shape(prompt, words[1]))
    if len(words) == 3 and words[0] == "a":
        return Obj(_shape(prompt, words[2]), _color(prompt, words[1]))
    raise _error(prompt, f"expected 'a <shape>' or 'a <colour> <shape>', got {' '.join(words)!r}")


def parse(prompt: str) -> Scene:
    """Parse a prompt of the grammar into a Scene; anything else raises ValueError naming it."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.split(" ")
    if not prompt or any(not w for w in words) or prompt != prompt.strip():
        raise _error(prompt, "prompts are single-spaced words with no leading or trailing space")
    if prompt != prompt.lower() or not all(w.isalpha() for w in words):
        raise _error(prompt, "prompts are lower case letters only, no punctuation")

    if words[0] in NUMBERS:  # counting: "{n} {shape}s"
        if len(words) != 2 or not words[1].endswith("s"):
            raise _error(prompt, "counting prompts read '<two|three|four> <shape>s'")
        shape = _shape(prompt, words[1][:-1])
        return Scene(prompt, "counting", (Obj(shape),) * NUMBERS[words[0]])

    if "and" in words:
        k = words.index("and")
        a, b = _noun_phrase(prompt, words[:k]), _noun_phrase(prompt, words[k + 1:])
        if a.shape == b.shape:
            raise _error(prompt, "the two objects must be different shapes")
        if (a.color is None) != (b.color is None):
            raise _error(prompt, "either both objects have a colour (color_attr) or neither (two_object)")
        if a.color is None:
            return Scene(prompt, "two_object", (a, b))
        if a.color == b.color:
            raise _error(prompt, "color_attr objects must have different colours")
        return Scene(prompt, "color_attr", (a, b))

    for rel in RELATIONS:
        rw = rel.split(" ")
        for k in range(len(words) - len(rw) + 1):
            if words[k:k + len(rw)] == rw:
                a, b = _noun_phrase(prompt, words[:k]), _noun_phrase(prompt, words[k + len(rw):])
                if a.color or b.color:
                    raise _error(prompt, "position prompts name no colours")
                if a.shape == b.shape:
                    raise _error(prompt, "the two objects must be different shapes")
                return Scene(prompt, "position", (a, b), rel)

    obj = _noun_phrase(prompt, words)
    return Scene(prompt, "colors" if obj.color else "single_object", (obj,))


def all_prompts(category: str) -> list[str]:
    """Every prompt of a category, in a fixed order."""
    if category == "single_object":
        return [f"a {s}" for s in SHAPES]
    if category == "two_object":
        return [f"a {a} and a {b}" for a in SHAPES for b in SHAPES if a != b]
    if category == "counting":
        return [f"{n} {s}s" for n in NUMBERS for s in SHAPES]
    if category == "colors":
        return [f"a {c} {s}" for c in COLORS for s in SHAPES]
    if category == "position":
        return [f"a {a} {r} a {b}" for a in SHAPES for r in RELATIONS for b in SHAPES if a != b]
    if category == "color_attr":
        return [
            f"a {c1} {s1} and a {c2} {s2}"
            for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES
            if c1 != c2 and s1 != s2
        ]
    raise ValueError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def sample_prompts(category: str, n: int, seed: int) -> list[str]:
    """``n`` prompts of ``category`` drawn uniformly (with replacement) from its templates, seeded."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = all_prompts(category)
    rng = random.Random(f"{category}:{seed}")
    return [rng.choice(pool) for _ in range(n)]


def eval_prompts(n_per_category: int, seed: int) -> list[tuple[str, str]]:
    """(category, prompt) pairs: ``n_per_category`` per category, in CATEGORIES order."""
    return [(c, p) for c in CATEGORIES for p in sample_prompts(c, n_per_category, seed)]
