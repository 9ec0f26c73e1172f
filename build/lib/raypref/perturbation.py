"""OSPO's prompt side: initial prompts per category, one-binding perturbations and densification.

Each perturbation changes exactly one object-level binding of a grammar prompt (replace a shape,
colour or number, swap two colours, reverse or change a relation, drop an object), so the image of
the perturbed prompt is a hard negative for the base prompt (``raypref.ospo``). A chat judge can
write, perturb and densify free-text prompts instead (the ``llm`` paths).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from raypref.shapes.grammar import COLORS, NUMBERS, SHAPES, Obj, Scene, parse, sample_prompts

if TYPE_CHECKING:
    from raypref.ospo_config import DensifySection, PerturbSection, PromptSection

# Perturbation operations available per shapes category (each changes exactly one binding).
OPERATIONS = {
    "single_object": ("replace_shape",),
    "two_object": ("replace_object", "drop_object"),
    "counting": ("change_number",),
    "colors": ("replace_color",),
    "position": ("reverse_relation", "change_relation"),
    "color_attr": ("swap_colors", "replace_color", "drop_object"),
}
ALL_OPERATIONS = tuple(dict.fromkeys(op for ops in OPERATIONS.values() for op in ops))
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DENSE_TEMPLATE = "a picture of {prompt} on a dark background"
DENSIFY_MODES = ("off", "record", "condition")
NUMBER_WORD = {v: k for k, v in NUMBERS.items()}


# ----------------------------------------------------------------------------- 1. initial prompts


def grammar_prompts(categories, per_category: int, seed: int) -> list[str]:
    """``per_category`` distinct prompts per shapes category (fewer if the category has fewer)."""
    out = []
    for cat in categories:
        if cat not in OPERATIONS:
            raise ValueError(f"unknown category {cat!r}; known: {', '.join(OPERATIONS)}")
        # Oversample with replacement, then keep distinct ones: duplicates would duplicate pairs.
        picked = list(dict.fromkeys(sample_prompts(cat, 8 * per_category, seed)))[:per_category]
        out += picked
    return out


def file_prompts(path: str | Path) -> list[str]:
    """Non-empty, stripped lines of a text file, in order, without duplicates."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist")
    return list(dict.fromkeys(x.strip() for x in p.read_text().splitlines() if x.strip()))


LLM_PROMPTS_TEMPLATE = (
    "Write {n} different text-to-image prompts that test {what}. Each prompt names concrete objects "
    "and their attributes. One prompt per line, nothing else."
)
LLM_CATEGORY_TEXT = {
    "color": "whether the model draws an object in the named colour",
    "shape": "whether the model draws objects of the named shapes",
    "counting": "whether the model draws exactly the named number of objects",
    "spatial": "whether the model places two objects in the named spatial relation",
    "color_attribution": "whether the model binds each of two colours to the right object",
    "complex": "several objects with attributes and relations at once",
}
LLM_PERTURB_TEMPLATE = (
    'Rewrite the text-to-image prompt "{prompt}" {m} times. Each rewrite changes exactly ONE object-level '
    "detail (one attribute of one object, one object, one count or one spatial relation, or swaps one "
    "attribute between two objects) and keeps everything else word for word. "
    "One rewrite per line, nothing else."
)
LLM_DENSIFY_TEMPLATE = (
    'Rewrite the two text-to-image prompts A: "{a}" and B: "{b}" into longer, more detailed prompts. '
    "Add the SAME details (background, style, lighting) to both, and keep the difference between them "
    "exactly as it is. Answer with two lines, 'A: ...' and 'B: ...', nothing else."
)


def _chat(judge, text: str) -> str:
    """One text-only turn with a chat judge (the ``openai`` / ``transformers`` backends)."""
    if judge is None or not hasattr(judge, "_chat"):
        raise ValueError(
            f"this step needs a chat judge (raypref.judges backend 'openai' or 'transformers'), "
            f"got {type(judge).__name__}"
        )
    judge.calls = getattr(judge, "calls", 0) + 1
    reply, _ = judge._chat(text, None, False)
    return reply


def llm_prompts(judge, category: str, n: int) -> list[str]:
    """Up to ``n`` prompts of an OSPO category written by the judge's LLM."""
    from raypref.judges.common import parse_lines

    if category not in LLM_CATEGORY_TEXT:
        raise ValueError(f"unknown OSPO category {category!r}; known: {', '.join(LLM_CATEGORY_TEXT)}")
    reply = _chat(judge, LLM_PROMPTS_TEMPLATE.format(n=n, what=LLM_CATEGORY_TEXT[category]))
    return list(dict.fromkeys(parse_lines(reply)))[:n]


def initial_prompts(cfg: PromptSection, judge=None) -> list[str]:
    """Base prompts from the configured source."""
    if cfg.source == "grammar":
        return grammar_prompts(cfg.categories, cfg.per_category, cfg.seed)
    if cfg.source == "file":
        return file_prompts(cfg.path)
    return [p for cat in LLM_CATEGORY_TEXT for p in llm_prompts(judge, cat, cfg.per_category)]


# ----------------------------------------------------------------------------- 2. perturbation


@dataclass(frozen=True)
class Perturbation:
    """One perturbed prompt. ``binding`` names what changed: ``obj{i}.shape``, ``obj{i}.color``,
    ``obj0.color<->obj1.color`` (a swap), ``obj{i}`` (dropped), ``count`` or ``relation``."""

    base: str
    perturbed: str
    operation: str
    binding: str
    category: str


def scene_prompt(objects, relation: str | None = None, count: int | None = None) -> str:
    """The grammar prompt of a scene (the inverse of ``parse``); raises ValueError outside the grammar."""
    np_ = lambda o: f"a {o.color} {o.shape}" if o.color else f"a {o.shape}"  # noqa: E731
    if count is not None:
        text = f"{NUMBER_WORD.get(count, count)} {objects[0].shape}s"
    elif relation is not None:
        text = f"{np_(objects[0])} {relation} {np_(objects[1])}"
    else:
        text = " and ".join(np_(o) for o in objects)
    parse(text)  # every perturbation must stay inside the grammar
    return text


def candidate_perturbations(prompt: str) -> list[Perturbation]:
    """Every one-binding perturbation of a grammar prompt, in a fixed order."""
    sc: Scene = parse(prompt)
    cat, objs, out = sc.category, list(sc.objects), []

    def add(op, binding, objects, relation=None, count=None):
        out.append(Perturbation(prompt, scene_prompt(objects, relation, count), op, binding, cat))

    if cat == "single_object":
        for s in SHAPES:
            if s != objs[0].shape:
                add("replace_shape", "obj0.shape", [Obj(s)])
    elif cat == "counting":
        for n in NUMBERS.values():
            if n != len(objs):
                add("change_number", "count", objs[:1], count=n)
    elif cat == "colors":
        for c in COLORS:
            if c != objs[0].color:
                add("replace_color", "obj0.color", [Obj(objs[0].shape, c)])
    elif cat == "position":
        add("reverse_relation", "relation", objs, OPPOSITE[sc.relation])
        for r in OPPOSITE:
            if r not in (sc.relation, OPPOSITE[sc.relation]):
                add("change_relation", "relation", objs, r)
    elif cat in ("two_object", "color_attr"):
        if cat == "two_object":
            third = next(s for s in SHAPES if s not in (objs[0].shape, objs[1].shape))
            for i in range(2):
                new = list(objs)
                new[i] = Obj(third)
                add("replace_object", f"obj{i}.shape", new)
        else:
            a, b = objs
            add("swap_colors", "obj0.color<->obj1.color", [Obj(a.shape, b.color), Obj(b.shape, a.color)])
            for i in range(2):
                for c in COLORS:
                    if c not in (a.color, b.color):  # a colour already used would merge the objects' colours
                        new = list(objs)
                        new[i] = Obj(objs[i].shape, c)
                        add("replace_color", f"obj{i}.color", new)
        for i in range(2):
            add("drop_object", f"obj{i}", [objs[1 - i]])
    return out


def _rng(*parts) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def perturb(prompt: str, m: int, operations=ALL_OPERATIONS, seed: int = 0) -> list[Perturbation]:
    """``m`` distinct perturbations of a grammar prompt (fewer if it has fewer), seeded by (seed,
    prompt). Operations are drawn uniformly first, then a candidate within the operation, so an
    operation with many candidates (replace_color: 12) does not crowd out one with few (swap: 1)."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    by_op: dict[str, list[Perturbation]] = {}
    for c in candidate_perturbations(prompt):
        if c.operation in operations:
            by_op.setdefault(c.operation, []).append(c)
    rng, out = _rng("ospo-perturb", seed, prompt), []
    while len(out) < m and by_op:
        op = rng.choice(sorted(by_op))
        out.append(by_op[op].pop(rng.randrange(len(by_op[op]))))
        if not by_op[op]:
            del by_op[op]
    return out


def llm_perturb(judge, prompt: str, m: int) -> list[Perturbation]:
    """Perturbations of a free-text prompt written by the judge's LLM (operation "llm_edit",
    binding unknown: the LLM is asked for a one-binding edit, which we cannot verify)."""
    from raypref.judges.common import parse_lines

    reply = _chat(judge, LLM_PERTURB_TEMPLATE.format(prompt=prompt, m=m))
    lines = [x for x in dict.fromkeys(parse_lines(reply)) if x != prompt][:m]
    return [Perturbation(prompt, x, "llm_edit", "unknown", "") for x in lines]


def perturbations(prompts, cfg: PerturbSection, judge=None) -> list[Perturbation]:
    """Grammar prompts through :func:`perturb`; other text through the judge's LLM."""
    out = []
    for p in prompts:
        try:
            parse(p)
        except ValueError:
            out += llm_perturb(judge, p, cfg.per_prompt)
            continue
        out += perturb(p, cfg.per_prompt, cfg.operations, cfg.seed)
    return out


# ----------------------------------------------------------------------------- 3. densification


def densify(prompt: str, template: str = DENSE_TEMPLATE) -> str:
    """Template densification: the same added context around any prompt."""
    return template.format(prompt=prompt)


def llm_densify(judge, base: str, perturbed: str) -> tuple[str, str]:
    """(dense base, dense perturbed) from the judge's LLM; ValueError if the reply is not two lines."""
    reply = _chat(judge, LLM_DENSIFY_TEMPLATE.format(a=base, b=perturbed))
    got = {}
    for line in reply.splitlines():
        key, _, text = line.strip().partition(":")
        if key.strip().upper() in ("A", "B") and text.strip():
            got[key.strip().upper()] = text.strip().strip("\"'")
    if set(got) != {"A", "B"}:
        raise ValueError(f"densification reply is not 'A: ...' and 'B: ...': {reply!r}")
    return got["A"], got["B"]


def dense_pair(p: Perturbation, cfg: DensifySection, judge=None) -> tuple[str, str]:
    """The prompts that condition generation for one perturbation (and head its Parquet row).

    ``off`` / ``record``: the original prompts. ``condition``: dense prompts (LLM for free text,
    template otherwise) - refused for grammar prompts, which the shapes model cannot read densified.
    """
    if cfg.mode != "condition":
        return p.base, p.perturbed
    if p.category:
        raise ValueError(
            f"densify.mode='condition' would feed {densify(p.base, cfg.template)!r} to a shapes-grammar model "
            "whose tokenizer and evaluator know only the grammar; use densify.mode='record' or 'off'"
        )
    return llm_densify(judge, p.base, p.perturbed) if judge is not None and hasattr(judge, "_chat") else (
        densify(p.base, cfg.template), densify(p.perturbed, cfg.template))
