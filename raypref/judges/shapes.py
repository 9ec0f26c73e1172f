"""The analytic shapes judge: the judge protocol over the ShapesEval detector, with an ``error_rate``
that simulates a weak VLM; prompt expansion and mutation through the shapes grammar."""

from __future__ import annotations

import random

import numpy as np

from raypref.judges.common import _BatchForms, _check_images, _digest, check_image
from raypref.shapes.detect import _scaled_checks, check_results, checks, detect
from raypref.shapes.grammar import CATEGORIES, COLORS, NUMBERS, SHAPES, GrammarError, all_prompts, parse


def _question_prompt(question: str) -> str:
    """A grammar prompt whose DSG questions include ``question`` (inverse of detect.checks)."""
    words = question.rstrip("?").split(" ")
    if not question.endswith("?"):
        raise GrammarError(f"question {question!r} is not one the shapes judge asks (no '?')")
    if words[:3] == ["is", "there", "a"] and len(words) == 4:  # is there a {shape}?
        return f"a {words[3]}"
    if words[:3] == ["is", "there", "a"] and len(words) == 5:  # is there a {color} {shape}? (color_attr)
        c, s = words[3], words[4]
        c2 = next(x for x in COLORS if x != c)
        s2 = next(x for x in SHAPES if x != s)
        return f"a {c} {s} and a {c2} {s2}"
    if words[:3] == ["are", "there", "exactly"] and len(words) == 5:  # are there exactly {n} {shape}s?
        names = {str(v): k for k, v in NUMBERS.items()}
        if words[3] not in names:
            raise GrammarError(f"question {question!r}: the shapes grammar counts {', '.join(names)} only")
        return f"{names[words[3]]} {words[4]}"
    if words[:2] == ["is", "the"] and len(words) == 4:  # is the {shape} {color}?
        return f"a {words[3]} {words[2]}"
    if words[:2] == ["is", "the"] and len(words) >= 6:  # is the {a} {relation} the {b}?
        return f"a {words[2]} {' '.join(words[3:-2])} a {words[-1]}"
    raise GrammarError(f"question {question!r} is not one the shapes judge asks")


class ShapesJudge(_BatchForms):
    """Analytic judge over the ShapesEval detector (``raypref.shapes.detect``).

    discriminate: the image with the highest fraction of the prompt's constraints met (ties to the
    lowest index); None if every fraction is 0 or the best is below ``threshold``. vqa: the
    detector's answer to each question the judge generated (p(yes) in {0, 1}).

    With probability ``error_rate`` an answer is replaced by a different, random one (another index
    or None; p -> 1 - p for vqa), simulating a weak VLM. The draw is a hash of (seed, inputs), so a
    given input always gets the same answer (replicas and repeated calls agree) and over distinct
    inputs about ``error_rate`` of the answers flip. expand / mutate use a seeded generator.
    """

    def __init__(self, error_rate: float = 0.0, seed: int = 0, threshold: float | None = None):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] or None, got {threshold}")
        self.error_rate, self.seed, self.threshold = float(error_rate), int(seed), threshold
        self.rng = random.Random(f"shapes-judge:{seed}")
        self.calls = 0
        self.unparsable = 0  # always 0: the analytic judge's answers are structured

    def scores(self, prompt: str, images) -> list[float]:
        """Fraction of the prompt's constraints each image meets, [N] floats in [0, 1]."""
        scene = parse(prompt)
        out = []
        for im in _check_images(images):
            res = check_results(scene, im)
            out.append(sum(ok for _, ok in res) / len(res))
        return out

    def discriminate(self, prompt: str, images) -> int | None:
        self.calls += 1
        images = _check_images(images)
        s = self.scores(prompt, images)
        best = int(np.argmax(s))  # argmax: ties to the lowest index
        ok = s[best] > 0 and (self.threshold is None or s[best] >= self.threshold)
        answer = best if ok else None
        u = _digest(self.seed, "discriminate", prompt, *images)
        if u < self.error_rate:
            others = [i for i in [*range(len(images)), None] if i != answer]
            answer = others[int(_digest(self.seed, "wrong", u) * len(others))]
        return answer

    def vqa(self, image, questions) -> list[float]:
        self.calls += 1
        image = check_image(image)
        found = detect(image)
        out = []
        for q in questions:
            fn = dict(_scaled_checks(parse(_question_prompt(q)), image.shape[0])).get(q)
            if fn is None:
                raise GrammarError(f"question {q!r} is not one the shapes judge asks")
            p = float(bool(fn(found)))
            if _digest(self.seed, "vqa", q, image) < self.error_rate:
                p = 1.0 - p
            out.append(p)
        return out

    def questions(self, prompt: str) -> list[str]:
        self.calls += 1
        return [q for q, _ in checks(parse(prompt))]

    def expand(self, prompt: str, n: int) -> list[str]:
        """``n`` other prompts of the same category (each differs in at least one slot); distinct
        while the category has enough prompts, then drawn again."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.calls += 1
        pool = [p for p in all_prompts(parse(prompt).category) if p != prompt]
        out = self.rng.sample(pool, min(n, len(pool)))
        out += [self.rng.choice(pool) for _ in range(n - len(out))]
        return out

    def mutate(self) -> str:
        self.calls += 1
        return self.rng.choice(all_prompts(self.rng.choice(CATEGORIES)))
