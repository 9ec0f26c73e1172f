"""OSPO pairs vs naive pairs at equal pair count (issue 7; the OSPO row of the paper reproductions).

One round from the same starting model: build OSPO pairs (one object binding perturbed, same
seeds, VQA-filtered) and naive pairs (two random samples of the same prompt ranked by the same VQA
judge), cut both to the same number of pairs (seeded), train the same LoRA Diffusion-DPO on each
(in this process, adapter folded in), and ShapesEval the
start, the naive and the OSPO model on the same prompts and seeds. Each --seeds entry draws its own
prompts, pairs and training noise. Prints one markdown table (mean ± sd over seeds), writes every
eval set under --out (manifest.jsonl + PNGs, re-scorable), results.json (re-running skips finished
seeds), table.md and a plot.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/reproduce/ospo_vs_naive.py --model shipped \
        --out outputs/ospo_vs_naive --per-category 16 --steps 60 --n-per-category 30 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler, fmt, load_results, names, save_results, subset_scores, train_lora  # noqa: E402

from raypref import ospo, ospo_config, perturbation  # noqa: E402
from raypref.checkpoints import resolve_checkpoint  # noqa: E402
from raypref.generators import PipelineGenerator  # noqa: E402
from raypref.prefdata import to_table  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402
from raypref.shapes.grammar import parse  # noqa: E402


def build(cfg: ospo_config.OSPOConfig) -> list[dict]:
    scorer = ospo.VQAScorer(cfg.judge.backend, cfg.filter.yes_threshold, **cfg.judge.kwargs())
    rows, _, summary = ospo.build_round(cfg, cfg.generate.generator, scorer)
    print(json.dumps({"mode": cfg.run.mode, **{k: v for k, v in summary.items() if not isinstance(v, list)}},
                     default=str), flush=True)
    return rows


def train(rows: list[dict], base: str, args, seed: int):
    """The same LoRA Diffusion-DPO for both arms, in this process (benchmarks/reproduce/common.py)."""
    adapter, _ = train_lora(rows, base, {"method": "dpo"}, steps=args.steps, lr=args.lr, batch_size=16, seed=seed,
                            sft_weight=args.sft_weight)
    return adapter


def plot(table: dict, cats: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = list(table)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        vals = [[r["categories"][c] for r in table[name]] for c in cats] + [[r["overall"] for r in table[name]]]
        ax.bar(np.arange(len(cats) + 1) + k * width, [np.mean(v) for v in vals], width,
               yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], capsize=2, label=name)
    ax.set_xticks(np.arange(len(cats) + 1) + width * (len(names) - 1) / 2, cats + ["overall"], rotation=15)
    ax.set_ylabel("ShapesEval")
    ax.set_title("OSPO vs naive pairs (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ospo_vs_naive.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shipped", help="starting checkpoint ('shipped' or a pipeline dir)")
    ap.add_argument("--out", default="outputs/ospo_vs_naive")
    ap.add_argument("--per-category", type=int, default=16, help="OSPO/naive prompts per category")
    ap.add_argument("--categories", nargs="+", default=list(ospo_config.PromptSection.categories),
                    help="grammar categories of the OSPO and naive prompts (e.g. the targeted: position color_attr)")
    ap.add_argument("--slots", type=int, default=ospo_config.GenerateSection.slots,
                    help="OSPO seeds per prompt: more slots find a passing chosen image for more hard prompts")
    ap.add_argument("--exclude-word", default="",
                    help="leave out base prompts naming this word (e.g. 'square', a shape the model cannot draw) "
                         "and also report ShapesEval on the eval prompts without it")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sft-weight", type=float, default=500.0)
    ap.add_argument("--n-per-category", type=int, default=30, help="ShapesEval prompts per category")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="each seed draws its own prompts, pairs and training noise")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=4, ignore_reinit_error=True)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = str(resolve_checkpoint(args.model))
    t0 = time.time()
    rpath = out / "results.json"
    table = load_results(rpath, args)  # re-running skips finished seeds
    if "start" not in table:
        gen = PipelineGenerator(base, num_inference_steps=args.sample_steps, guidance_scale=3.0)
        table["start"] = [run_eval(gen, args.n_per_category, args.eval_seed, out / "eval_start")]
        save_results(rpath, table)
    for seed in args.seeds:
        if any(r.get("seed_train") == seed for r in table.get("ospo", [])):
            continue
        cfg = ospo_config.shapes_cpu()
        prompts = dataclasses.replace(cfg.prompts, per_category=args.per_category, seed=seed,
                                      categories=tuple(args.categories))
        if args.exclude_word:  # the same grammar draw, as a prompt file without the word
            path = out / f"prompts_s{seed}.txt"
            kept = [p for c in args.categories for p in perturbation.grammar_prompts([c], 8 * args.per_category, seed)
                    if not names(p, args.exclude_word)]
            per_cat = {c: [p for p in kept if parse(p).category == c][:args.per_category] for c in args.categories}
            path.write_text("\n".join(p for c in args.categories for p in per_cat[c]) + "\n")
            prompts = dataclasses.replace(prompts, source="file", path=str(path))
        cfg = dataclasses.replace(
            cfg, prompts=prompts,
            generate=dataclasses.replace(cfg.generate, generator=f"checkpoint:{base}", seed=seed, slots=args.slots,
                                         num_inference_steps=args.sample_steps),
            run=dataclasses.replace(cfg.run, output=str(out / f"ospo_s{seed}.parquet"), use_ray="always"))
        ospo_rows = build(cfg)
        naive_rows = build(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode="naive")))
        n = min(len(ospo_rows), len(naive_rows))
        rng = random.Random(seed)
        arms = {"naive": rng.sample(naive_rows, n), "ospo": rng.sample(ospo_rows, n)}
        for name, rows in arms.items():
            pq.write_table(to_table(rows), out / f"{name}_s{seed}_pairs.parquet")
            sampler = Sampler(train(rows, base, args, seed), name, args.sample_steps)
            score = run_eval(sampler, args.n_per_category, args.eval_seed, out / f"eval_{name}_s{seed}")
            score.update(seed_train=seed, pairs=n)
            table.setdefault(name, []).append(score)
        save_results(rpath, table)
        print(f"seed {seed}: {n} pairs per arm; naive {table['naive'][-1]['overall']:.3f}, "
              f"ospo {table['ospo'][-1]['overall']:.3f}", flush=True)
    cats = list(table["start"][0]["categories"])
    pairs = [r["pairs"] for r in table["ospo"]]
    lines = [f"pairs per arm: {pairs} (seeds {[r['seed_train'] for r in table['ospo']]}); {args.steps} DPO steps "
             f"(LoRA, lr {args.lr}, sft_weight {args.sft_weight}); ShapesEval {args.n_per_category} per category, "
             f"eval seed {args.eval_seed}; {time.time() - t0:.0f} s",
             "", "| model | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
    for name, runs in table.items():
        lines.append(f"| {name} | " + " | ".join(fmt([r["categories"][c] for r in runs]) for c in cats)
                     + f" | {fmt([r['overall'] for r in runs])} |")
    if args.exclude_word:
        lines += ["", f"The same eval images, prompts without {args.exclude_word!r} only:", "",
                  "| model | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
        dirs = {"start": [out / "eval_start"], **{name: [out / f"eval_{name}_s{r['seed_train']}" for r in table[name]]
                                                  for name in ("naive", "ospo") if name in table}}
        for name, ds in dirs.items():
            subs = [subset_scores(d, args.exclude_word) for d in ds]
            lines.append(f"| {name} | " + " | ".join(fmt([sc[c] for sc in subs]) for c in cats)
                         + f" | {fmt([sum(sc.values()) / len(sc) for sc in subs])} |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot(table, cats, out)
    return table


if __name__ == "__main__":
    main()
