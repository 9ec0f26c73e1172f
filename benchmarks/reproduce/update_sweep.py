"""Which few-minute update moves the shipped shapes model? One seed, many recipes, one eval set.

Samples the start model ``--samples`` times on ``--per-category`` training prompts per category
(seeds disjoint from ShapesEval's), then trains each arm in this process from the start model and
ShapesEvals it on the same prompts and seeds (``--n-per-category``, eval seed 0). Arms are
``DATA:STEPS:LR[:opt=value...]``:

    DATA  rft    SFT on the model's own samples that pass (rejection-sampling fine-tuning)
          clean  SFT on the clean teacher's render of each training prompt
          sq     SFT on clean renders of prompts that name a square (the shape the model lacks)
          spin   DPO: clean render (winner) vs one failing own sample of the prompt (SPIN-style)
          onp    DPO: a passing vs a failing own sample of the same prompt (on-policy pairs)
    opts  full=1 (full fine-tuning; default LoRA rank 16 on the driver's targets), sftw=W (DPO winner
          term, loss.sft_weight), drop=P (data.cfg_dropout), bs=B (prompts per step, default 16)

Prints one line per arm and a markdown table; writes results.json (re-running skips finished arms)
and every eval set under --out (shapes-eval dirs).

    .venv/bin/python benchmarks/reproduce/update_sweep.py --out outputs/update_sweep \\
        --arms rft:1:1e-9 clean:60:1e-3 rft:100:3e-4 onp:100:1e-4:sftw=500 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler, save_results, setup, subset_scores, train_lora  # noqa: E402

from raypref.generators import PipelineGenerator  # noqa: E402
from raypref.prefdata import encode_png, make_row, prompt_id  # noqa: E402
from raypref.shapes.detect import passes  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402
from raypref.shapes.grammar import CATEGORIES, sample_prompts  # noqa: E402
from raypref.shapes.teachers import Teacher  # noqa: E402

SFT_DATA, DPO_DATA = ("rft", "clean", "sq"), ("spin", "onp")


def sft_row(prompt, category, image, generator, seed) -> dict:
    return {"prompt_id": prompt_id(prompt), "prompt": prompt, "category": category, "images": [encode_png(image)],
            "generators": [generator], "seeds": [int(seed)], "reward_names": [], "scores": [], "phi": [1.0],
            "ranking": [1], "pairs": []}


def pair_row(prompt, category, win, lose, gens, seeds) -> dict:
    return make_row(prompt, category, [win, lose], gens, seeds, ["passes"], [[1.0, 0.0]], [1.0, 0.0], [1, 2],
                    [(0, 1, 1, 0)])


def own_samples(gen, per_category: int, samples: int, cache: Path):
    """(prompts, categories, seeds, images [N, H, W, 3]) of the start model on the training prompts."""
    if cache.exists():
        z = np.load(cache)
        return list(z["p"]), list(z["c"]), [int(s) for s in z["s"]], z["i"]
    prompts, cats, seeds = [], [], []
    for ci, c in enumerate(CATEGORIES):
        for j, p in enumerate(sample_prompts(c, per_category, 777)):
            for k in range(samples):  # seeds far from ShapesEval's (seed * 1e6 + ...)
                prompts.append(p), cats.append(c), seeds.append(900_000_000 + ci * 100_000 + j * 100 + k)
    images = np.stack(
        [im for i in range(0, len(prompts), 64) for im in gen.generate(prompts[i : i + 64], seeds[i : i + 64])]
    )
    np.savez(cache, p=prompts, c=cats, s=seeds, i=images)
    return prompts, cats, seeds, images


def datasets(prompts, cats, seeds, images) -> dict[str, list[dict]]:
    ok = [passes(p, im) for p, im in zip(prompts, images)]
    clean = Teacher("clean")
    by_prompt = defaultdict(list)
    for p, c, s, im, o in zip(prompts, cats, seeds, images, ok):
        by_prompt[(p, c)].append((im, s, o))
    clean_img = {pc: clean.generate([pc[0]], [i])[0] for i, pc in enumerate(sorted(by_prompt))}
    data = {
        "rft": [sft_row(p, c, im, "self", s) for p, c, s, im, o in zip(prompts, cats, seeds, images, ok) if o],
        "clean": [sft_row(p, c, im, "teacher:clean", i) for i, ((p, c), im) in enumerate(sorted(clean_img.items()))],
        "sq": [
            sft_row(p, c, clean.generate([p], [50_000 + i])[0], "teacher:clean", 50_000 + i)
            for i, (p, c) in enumerate((p, c) for c in CATEGORIES for p in sample_prompts(c, 200, 5) if "square" in p)
        ],
        "spin": [],
        "onp": [],
    }
    for (p, c), lst in by_prompt.items():
        wins, fails = [x for x in lst if x[2]], [x for x in lst if not x[2]]
        if fails:
            data["spin"].append(
                pair_row(p, c, clean_img[(p, c)], fails[0][0], ["teacher:clean", "self"], [0, fails[0][1]])
            )
        for w, f in list(zip(wins, fails))[:3]:
            data["onp"].append(pair_row(p, c, w[0], f[0], ["self", "self"], [w[1], f[1]]))
    return data, float(np.mean(ok))


def train_arm(rows, base: str, arm: str):
    """Parse ``arm`` and train it from ``base`` in this process -> (pipeline, last metrics)."""
    kind, steps, lr, *rest = arm.split(":")
    opts = dict(o.split("=") for o in rest)
    method = "sft" if kind in SFT_DATA else "dpo"
    return train_lora(
        rows,
        base,
        {"method": method},
        steps=int(steps),
        lr=float(lr),
        batch_size=int(opts.get("bs", 16)),
        seed=0,
        sft_weight=float(opts.get("sftw", 0)),
        lora=opts.get("full") != "1",
        cfg_dropout=float(opts.get("drop", 0)),
    )


def table(results: dict) -> str:
    head = "| arm | rows | train s | " + " | ".join(CATEGORIES) + " | overall | circle / square / triangle drawn |"
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 5)]
    for arm, r in results.items():
        if arm.startswith("_"):
            continue
        sh = r.get("shapes", {})
        lines.append(f"| {arm} | {r.get('rows', '-')} | {r.get('train_seconds', 0):.0f} | "
                     + " | ".join(f"{r['categories'][c]:.2f}" for c in CATEGORIES)
                     + f" | **{r['overall']:.3f}** | {sh.get('circle', 0):.2f} / {sh.get('square', 0):.2f} / "
                       f"{sh.get('triangle', 0):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--arms", nargs="+", required=True, help="DATA:STEPS:LR[:opt=value...] (module docstring)")
    ap.add_argument("--per-category", type=int, default=40, help="training prompts per category")
    ap.add_argument("--samples", type=int, default=8, help="own samples per training prompt")
    ap.add_argument("--n-per-category", type=int, default=50, help="ShapesEval prompts per category")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for arm in args.arms:
        if arm.split(":")[0] not in SFT_DATA + DPO_DATA or arm.count(":") < 2:
            ap.error(f"bad arm {arm!r}: expected DATA:STEPS:LR[:opt=value...] with DATA in {SFT_DATA + DPO_DATA}")
    out, base, rpath, results = setup(args, ignore=("arms",))  # an arm's key is its whole recipe
    gen = PipelineGenerator(base, num_inference_steps=20, guidance_scale=3.0)
    t0 = time.time()
    samples = own_samples(
        gen, args.per_category, args.samples, out / f"samples_{args.per_category}x{args.samples}.npz"
    )
    data, own_rate = datasets(*samples)
    results["_data"] = {"own_pass_rate": own_rate, "rows": {k: len(v) for k, v in data.items()},
                        "seconds": time.time() - t0}
    print(json.dumps(results["_data"]), flush=True)
    if "start" not in results:
        results["start"] = run_eval(gen, args.n_per_category, 0, out / "eval_start")
        save_results(rpath, results)
    for arm in args.arms:
        if arm in results:
            continue
        t0 = time.time()
        rows = data[arm.split(":")[0]]
        pipe, metrics = train_arm(rows, base, arm)
        seconds = time.time() - t0
        results[arm] = {**run_eval(Sampler(pipe, arm), args.n_per_category, 0, out / f"eval_{arm.replace(':', '_')}"),
                        "train_seconds": seconds, "rows": len(rows), "last_metrics": metrics}
        save_results(rpath, results)
        print(arm, f"{results[arm]['overall']:.3f}", results[arm]["shapes"], flush=True)
    text = table(results)
    # the start model on the eval prompts that name a square and on the others (the shape it lacks)
    for naming in (True, False):
        sub = subset_scores(out / "eval_start", "square", naming)
        text += (f"\n\nstart, eval prompts {'naming' if naming else 'not naming'} a square: "
                 + ", ".join(f"{c} {sub[c]:.2f}" for c in CATEGORIES if c in sub))
    (out / "table.md").write_text(text + "\n")
    print(text)
    return results


if __name__ == "__main__":
    main()
