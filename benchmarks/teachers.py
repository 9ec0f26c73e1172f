"""ShapesEval of every procedural teacher against its designed pass rates.

    .venv/bin/python benchmarks/teachers.py --n-per-category 200 --seed 0

Prints a markdown table: measured (designed) per category, the largest deviation, and the cost.
"""

from __future__ import annotations

import argparse
import time

from raypref.shapes.evaluate import run_eval
from raypref.shapes.grammar import CATEGORIES
from raypref.shapes.teachers import PROFILES, Teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-per-category", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print("| teacher | " + " | ".join(CATEGORIES) + " | overall | max dev | cost/call | s |")
    print("|---" * (len(CATEGORIES) + 5) + "|")
    for name, prof in PROFILES.items():
        t0 = time.time()
        t = Teacher(name)
        s = run_eval(t, args.n_per_category, args.seed)
        dev = max(abs(s["categories"][c] - prof.pass_rate(c)) for c in CATEGORIES)
        cells = [f"{s['categories'][c]:.3f} ({prof.pass_rate(c):.2f})" for c in CATEGORIES]
        print(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {s['overall']:.3f} | {dev:.3f} | {prof.cost:g} | {time.time() - t0:.1f} |"
        )


if __name__ == "__main__":
    main()
