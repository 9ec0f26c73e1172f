"""ShapesEval evaluation sets: generate, score, and write a directory any tool can re-score.

    DIR/images/NNNNN_<category>.png
    DIR/manifest.jsonl   {"prompt", "category", "image" (relative to DIR), "seed", "passed"} per line
    DIR/scores.json      {"categories": {name: score}, "overall": score, "n": count, "generator": spec,
                         "shapes": {shape: fraction of the prompts naming it whose image has one}}
"""

from __future__ import annotations

import json
from pathlib import Path

from raypref.files import atomic_write
from raypref.shapes.detect import shapes_eval
from raypref.shapes.grammar import CATEGORIES, sample_prompts


def eval_set(n_per_category: int, seed: int) -> list[tuple[str, str, int]]:
    """(category, prompt, image seed) triples. Image seeds are consecutive within a category."""
    return [
        (c, p, seed * 1_000_000 + ci * 10_000 + i)
        for ci, c in enumerate(CATEGORIES)
        for i, p in enumerate(sample_prompts(c, n_per_category, seed))
    ]


def run_eval(
    generator, n_per_category: int, seed: int, out_dir: str | Path | None = None, batch_size: int = 64
) -> dict:
    """Generate the eval set with ``generator`` (has ``generate(prompts, seeds)``), score it, and
    write it to ``out_dir`` when given. Returns the scores dict."""
    if n_per_category < 1:
        raise ValueError(f"n_per_category must be >= 1, got {n_per_category}")
    items = eval_set(n_per_category, seed)
    images = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        images.extend(generator.generate([p for _, p, _ in chunk], [s for _, _, s in chunk]))
    result = shapes_eval([p for _, p, _ in items], images)
    scores = {**_summary(result), "generator": getattr(generator, "name", str(generator)), "seed": seed}
    if out_dir is not None:
        write_eval_dir(out_dir, items, images, result["passed"], scores)
    return scores


def write_eval_dir(out_dir, items, images, passed, scores) -> None:
    from raypref.prefdata import encode_png

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, ((cat, prompt, s), im, ok) in enumerate(zip(items, images, passed)):
        rel = f"images/{k:05d}_{cat}.png"
        (out / rel).write_bytes(encode_png(im))
        lines.append(json.dumps({"prompt": prompt, "category": cat, "image": rel, "seed": s, "passed": bool(ok)}))
    atomic_write(out / "manifest.jsonl", "\n".join(lines) + "\n")
    atomic_write(out / "scores.json", json.dumps(scores, indent=1) + "\n")


def rescore_dir(out_dir) -> dict:
    """Re-score a written evaluation directory from its PNGs alone."""
    from raypref.prefdata import decode_png

    out = Path(out_dir)
    if not (out / "manifest.jsonl").exists():
        raise ValueError(f"{out} is not an evaluation set (no manifest.jsonl)")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    result = shapes_eval([r["prompt"] for r in rows], [decode_png((out / r["image"]).read_bytes()) for r in rows])
    return _summary(result)


def _summary(result: dict) -> dict:
    """The scores.json fields of a ``shapes_eval`` result (everything but the per-image verdicts)."""
    return {k: result[k] for k in ("categories", "overall", "n", "shapes")}


def format_table(scores: dict) -> str:
    cats = scores["categories"]
    head = "| " + " | ".join(["generator", *cats, "overall"]) + " |"
    sep = "|" + "---|" * (len(cats) + 2)
    row = "| " + " | ".join([scores.get("generator", ""), *(f"{v:.3f}" for v in cats.values()),
                              f"{scores['overall']:.3f}"]) + " |"
    lines = [head, sep, row]
    if scores.get("shapes"):  # diagnostic, not part of the score
        lines.append("\nshape drawn, of the prompts naming it: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in scores["shapes"].items()))
    return "\n".join(lines)
