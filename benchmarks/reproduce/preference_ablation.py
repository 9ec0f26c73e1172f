"""RankDPO's ablation and BalancedDPO's claim on one Syn-Pic set (issue 9, experiments 3 and 4).

Every arm starts from the same model, sees the same images (one Syn-Pic Parquet set: K generators
x n rewards per prompt) and trains the same LoRA for the same steps; arms differ only in how the
stored scores become labels (``raypref.prefdata.relabel``) and in the loss:

RankDPO ablation (the paper's table; claim: rankdpo >= dpo_synpic > dpo_one_reward > random)
    sft_top          SFT on the top image by Syn-Pic phi
    dpo_one_reward   DPO, (best, worst) by one reward (``--single-reward``)
    dpo_synpic       DPO, (best, worst) by Syn-Pic phi over all rewards
    dpo_gain         RankDPO loss with gain weights, no DCG discount ("DPO + gain weights")
    rankdpo          RankDPO (DCG-weighted pairwise loss over all K)
    random           DPO on a random order of the K images (the floor)
BalancedDPO (claim: consensus improves every metric together where mixing trades one for another)
    bal_consensus    pairwise loss on majority-vote pairs across rewards
    bal_mixing       the same loss on pairs ordered by the z-normalised reward sum
    bal_single       the same loss on pairs ordered by one reward

Each trained model (LoRA folded) is evaluated with ShapesEval on the same prompts and seeds as
the start; the eval images are written as shapes-eval dirs (manifest.jsonl + PNGs). Win rates
against the start are per eval prompt (same prompt and seed), per metric: faithfulness,
aesthetic and the shipped shapes CLIP (ties count one half). Prints the tables (mean and spread
over seeds), writes ``results.json``, ``table.md`` and two PNG plots under --out.

    RAY_AUTH_MODE=disabled .venv/bin/python jobs/build_synpic.py prompts.n_per_category=135 \\
        run.output_dir=outputs/synpic_ablation run.chunk_size=64
    .venv/bin/python benchmarks/reproduce/preference_ablation.py --data outputs/synpic_ablation/data \\
        --out outputs/preference_ablation --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sampler, add_run_args, fmt, save_results, score_eval_dir, setup, train_lora, win_rate  # noqa: E402

from raypref.checkpoints import load_model  # noqa: E402
from raypref.prefdata import relabel  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402

# arm -> (labeling, loss overrides); "{single}" is replaced by --single-reward
ARMS = {
    "sft_top": ("synpic", {"method": "sft", "sft_weight": 0.0}),
    "dpo_one_reward": ("reward:{single}", {"method": "dpo"}),
    "dpo_synpic": ("synpic", {"method": "dpo"}),
    "dpo_gain": ("synpic", {"method": "rankdpo", "rank_weights": "gain"}),
    "rankdpo": ("synpic", {"method": "rankdpo", "rank_weights": "dcg"}),
    "random": ("random", {"method": "dpo"}),
    "bal_consensus": ("synpic", {"method": "balanced"}),
    "bal_mixing": ("mixed", {"method": "balanced"}),
    "bal_single": ("reward:{single}", {"method": "balanced"}),
}
RANKDPO_ARMS = ["sft_top", "dpo_one_reward", "dpo_synpic", "dpo_gain", "rankdpo", "random"]
BALANCED_ARMS = ["bal_consensus", "bal_mixing", "bal_single"]
WIN_METRICS = ("faithfulness", "aesthetic", "clip:shipped")


def load_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    if not rows:
        raise ValueError(f"no preference rows in {path}")
    return rows


def train_arm(rows: list[dict], base: str, arm: str, seed: int, args):
    """Relabel the rows for ``arm`` and LoRA-train it in this process -> (folded adapter, metrics)."""
    labeling, loss = ARMS[arm]
    labeled = [relabel(r, labeling.format(single=args.single_reward), seed=seed) for r in rows]
    return train_lora(labeled, base, loss, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=seed,
                      sft_weight=args.sft_weight)


def tables(results: dict, cats: list[str], arms: list[str]) -> str:
    lines = []
    rk = [a for a in RANKDPO_ARMS if a in arms]
    if rk:
        lines += ["| arm | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
        for arm in ["start", *rk]:
            runs = results[arm]
            lines.append(f"| {arm} | " + " | ".join(fmt([r["categories"][c] for r in runs]) for c in cats)
                         + f" | {fmt([r['overall'] for r in runs])} |")
        lines.append("")
    bal = [a for a in BALANCED_ARMS if a in arms]
    if bal:
        lines += ["| arm | " + " | ".join(f"win rate {m}" for m in WIN_METRICS) + " | ShapesEval overall |",
                  "|---" * (len(WIN_METRICS) + 2) + "|"]
        for arm in bal:
            runs = results[arm]
            lines.append(f"| {arm} | " + " | ".join(fmt([r["win_rate"][m] for r in runs]) for m in WIN_METRICS)
                         + f" | {fmt([r['overall'] for r in runs])} |")
    return "\n".join(lines)


def plot(results: dict, arms: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rk = ["start", *[a for a in RANKDPO_ARMS if a in arms]]
    if len(rk) > 1:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        vals = [[r["overall"] for r in results[a]] for a in rk]
        ax.bar(rk, [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
               capsize=4, color="#4c72b0")
        for i, v in enumerate(vals):
            ax.scatter([i] * len(v), v, color="k", s=8, zorder=3)
        ax.set_ylabel("ShapesEval overall")
        ax.set_title("RankDPO ablation (mean ± sd over seeds, dots = seeds)")
        plt.xticks(rotation=20)
        fig.tight_layout()
        fig.savefig(out / "rankdpo_ablation.png", dpi=110)
        plt.close(fig)
    bal = [a for a in BALANCED_ARMS if a in arms]
    if bal:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        width = 0.8 / len(bal)
        for k, arm in enumerate(bal):
            means = [np.mean([r["win_rate"][m] for r in results[arm]]) for m in WIN_METRICS]
            ax.bar(np.arange(len(WIN_METRICS)) + k * width, means, width, label=arm)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(WIN_METRICS)) + width * (len(bal) - 1) / 2, WIN_METRICS)
        ax.set_ylabel("win rate vs start")
        ax.set_title("BalancedDPO: labelings, per-metric win rate (mean over seeds)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "balanced_win_rates.png", dpi=110)
        plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Syn-Pic Parquet (file or dir of chunks)")
    add_run_args(ap, steps=40, lr=1e-4)
    ap.add_argument("--out", default="outputs/preference_ablation")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--sft-weight", type=float, default=500.0, help="RPO-style winner term of the preference arms")
    ap.add_argument("--single-reward", default="faithfulness")
    args = ap.parse_args(argv)

    from raypref.rewards import build_reward

    out, base, results_path, results = setup(args, ignore=("arms",))  # re-running skips finished runs
    rows = load_rows(args.data)
    rewards = {}
    for m in WIN_METRICS:
        key, _, path = m.partition(":")
        rewards[m] = build_reward(key, name=key, **({"model_path": path} if path else {}))
    t0 = time.time()
    start_dir = out / "eval_start"
    if "start" not in results:
        score = run_eval(Sampler(load_model(base), "start", args.sample_steps), args.n_per_category,
                         args.eval_seed, start_dir)
        results["start"] = [score]
    start_scores = score_eval_dir(start_dir, rewards)
    for arm in args.arms:
        for seed in args.seeds:
            done = [r for r in results.get(arm, []) if r["seed_train"] == seed]
            if done:
                continue
            ta = time.time()
            adapter, metrics = train_arm(rows, base, arm, seed, args)
            train_s = time.time() - ta
            eval_dir = out / f"eval_{arm}_s{seed}"
            score = run_eval(Sampler(adapter, arm, args.sample_steps), args.n_per_category, args.eval_seed, eval_dir)
            arm_scores = score_eval_dir(eval_dir, rewards)
            score.update(seed_train=seed, train_seconds=train_s, last_metrics=metrics,
                         win_rate={m: win_rate(arm_scores[m], start_scores[m]) for m in WIN_METRICS})
            results.setdefault(arm, []).append(score)
            save_results(results_path, results)
            print(f"{arm} seed {seed}: overall {score['overall']:.3f}, win rates "
                  + ", ".join(f"{m} {v:.2f}" for m, v in score["win_rate"].items())
                  + f" ({train_s:.0f} s training, {time.time() - t0:.0f} s so far)", flush=True)
    cats = list(results["start"][0]["categories"])
    md = (f"{len(rows)} Syn-Pic prompts from {args.data}; {args.steps} steps, LoRA rank 16, lr {args.lr}, "
          f"batch {args.batch_size}, sft_weight {args.sft_weight}; seeds {args.seeds}; ShapesEval "
          f"{args.n_per_category} per category, eval seed {args.eval_seed}; {time.time() - t0:.0f} s\n\n"
          + tables(results, cats, args.arms))
    print(md)
    (out / "table.md").write_text(md + "\n")
    plot(results, args.arms, out)
    return results


if __name__ == "__main__":
    main()
