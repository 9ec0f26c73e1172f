"""Can on-policy DPO move the shipped shapes model? The precondition for every alignment result.

For each seed: sample the start model on training prompts (disjoint from ShapesEval's prompts and
seeds), label its own samples with the faithfulness reward (1.0 exactly when ShapesEval passes),
pair a passing sample with a failing one of the same prompt, and train LoRA Diffusion-DPO in this
process, with the winners' denoising error added as an anchor (``--sft-weight``); with
``--iterations N`` the sample-pair-train loop runs N times, each from the model the last one left
(LoRA folded in, fresh prompts and seeds), on-policy throughout. Training time over all iterations
is at most ``--minutes`` (sampling excluded); then ShapesEval before and after on the same 300 eval
images.

    .venv/bin/python benchmarks/movability.py --out outputs/movability

Writes every evaluated model's images as a shapes-eval directory (``before/``, ``after_s{seed}/``),
``results.json`` (a re-run with the same options skips finished seeds), and prints
``movability: mean gain X, min gain Y`` as its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "reproduce"))
from common import Sampler, fmt, save_results, setup, train_lora  # noqa: E402

from raypref.generators import PipelineGenerator  # noqa: E402
from raypref.prefdata import make_row  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402
from raypref.shapes.grammar import CATEGORIES, sample_prompts  # noqa: E402
from raypref.shapes.score import faithfulness  # noqa: E402


def own_samples(gen, prompts: list[str], seeds: list[int], chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The model's images of ``prompts`` at ``seeds`` (generated ``chunk`` at a time) and their
    faithfulness (1.0 exactly when ShapesEval passes); -> (images [N, H, W, 3], scores [N])."""
    images = np.concatenate([gen.generate(prompts[i:i + chunk], seeds[i:i + chunk])
                             for i in range(0, len(prompts), chunk)])
    return images, np.array([faithfulness(p, im) for p, im in zip(prompts, images)])


def onpolicy_pairs(
    gen, per_category: int, samples: int, seed: int, max_pairs_per_prompt: int = 2
) -> tuple[list, dict]:
    """DPO rows (winner: a sample scoring 1.0, loser: one scoring below) from ``samples`` own samples
    of each of ``per_category`` training prompt slots per category; -> (rows, stats)."""
    prompts, cats, seeds = [], [], []
    for ci, c in enumerate(CATEGORIES):
        # drawn with replacement: a category with few distinct prompts (three single-object ones)
        # still gets per_category prompt slots, each with its own seeds
        for j, p in enumerate(sample_prompts(c, per_category, 777 + seed)):
            for k in range(samples):  # seeds far from ShapesEval's
                prompts.append(p), cats.append(c)
                seeds.append(900_000_000 + seed * 10_000_000 + ci * 100_000 + j * 100 + k)
    images, score = own_samples(gen, prompts, seeds)
    rows, by_slot = [], {}
    for i, p in enumerate(prompts):
        by_slot.setdefault((p, seeds[i] // 100), []).append(i)  # the samples of one prompt slot
    for (p, _), idx in by_slot.items():
        wins = [i for i in idx if score[i] == 1.0]
        fails = sorted((i for i in idx if score[i] < 1.0), key=lambda i: score[i])  # clearest failures first
        for w, f in list(zip(wins, fails))[:max_pairs_per_prompt]:
            rows.append(make_row(p, cats[w], [images[w], images[f]], ["self", "self"], [seeds[w], seeds[f]],
                                 ["faithfulness"], [[1.0, float(score[f])]], [1.0, 0.0], [1, 2], [(0, 1, 1, 0)]))
    return rows, {"samples": len(prompts), "own_pass_rate": float((score == 1.0).mean()), "pairs": len(rows)}


def _float_or_none(value: str) -> float | None:
    return None if value == "none" else float(value)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="shipped", help="starting checkpoint ('shipped' or a pipeline dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time cap per seed (sampling excluded)")
    ap.add_argument("--iterations", type=int, default=1,
                    help="on-policy sample-pair-train loops per seed, sharing the --minutes training budget")
    ap.add_argument("--steps", type=int, default=450)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=None, help="loss.beta (default: the trainer's)")
    # DPO alone moved `web2` (the 8 x 8 model shipped before) by +0.027 (mean of 3 seeds); the winner anchor with
    # 8 own samples per prompt by more than twice that (docs/results.md, "Moving web2").
    ap.add_argument("--sft-weight", type=float, default=1000.0,
                    help="loss.sft_weight: add this x the winner's denoising error to the DPO loss (an anchor "
                         "on the passing images, as the driver's DPO stage uses; 0 for DPO alone)")
    # The shipped model's errors (a wrong colour or count) are decided at high noise, where mean 2.5 puts
    # most steps (docs/results.md, "Training noise levels").
    ap.add_argument("--t-logit-mean", type=_float_or_none, default=2.5,
                    help="loss.t_logit_mean: draw training noise levels from a logit-normal with this mean "
                         "(default 2.5; 'none' keeps the trainer's noise levels, as a DDPM model needs)")
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    ap.add_argument("--per-category", type=int, default=40, help="training prompt slots per category")
    ap.add_argument("--samples", type=int, default=8, help="own samples per training prompt")
    ap.add_argument("--n-per-category", type=int, default=50, help="ShapesEval prompts per category")
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    out, base, rpath, results = setup(args)  # results: finished seeds of this recipe
    gen = PipelineGenerator(base, num_inference_steps=args.sample_steps, guidance_scale=3.0)
    if "before" not in results:
        results["before"] = run_eval(gen, args.n_per_category, 0, out / "before")
        save_results(rpath, results)
    before = results["before"]["overall"]
    print(f"before: ShapesEval {before:.3f} " + json.dumps(results["before"]["shapes"]), flush=True)
    loss = {"method": "dpo", **({"beta": args.beta} if args.beta is not None else {}),
            **({"t_logit_mean": args.t_logit_mean} if args.t_logit_mean is not None else {})}
    for seed in args.seeds:
        key = f"s{seed}"
        if key in results:
            continue
        model, start, sample_s, train_s, stats, metrics, steps = None, base, 0.0, 0.0, {}, {}, 0
        for it in range(args.iterations):
            t0 = time.time()
            sampler = gen if model is None else Sampler(model, f"it{it}", steps=args.sample_steps)
            rows, stats = onpolicy_pairs(sampler, args.per_category, args.samples, seed + 100 * it)
            sample_s += time.time() - t0
            t0 = time.time()
            model, metrics = train_lora(rows, start, loss, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                        sft_weight=args.sft_weight, seed=seed + 100 * it,
                                        max_seconds=args.minutes * 60 / args.iterations)
            train_s += time.time() - t0
            steps += int(metrics.get("step") or 0)
            if it < args.iterations - 1:  # the next iteration's policy and reference
                start = str(out / f"model_{key}_it{it}")
                model.save_pretrained(start)
            print(f"seed {seed} iteration {it}: {stats['pairs']} pairs (own pass rate {stats['own_pass_rate']:.2f}), "
                  f"{metrics.get('step')} steps", flush=True)
        after = run_eval(Sampler(model, f"dpo_{key}", steps=args.sample_steps), args.n_per_category, 0,
                         out / f"after_{key}")
        results[key] = {**after, **stats, "sample_seconds": sample_s, "train_seconds": train_s, "steps": steps,
                        "iterations": args.iterations, "gain": after["overall"] - before, "last_metrics": metrics}
        save_results(rpath, results)
        print(f"seed {seed}: {args.iterations} iteration(s), sampled in {sample_s:.0f} s, {steps} steps in "
              f"{train_s:.0f} s: ShapesEval {before:.3f} -> "
              f"{after['overall']:.3f} " + json.dumps(after["shapes"]), flush=True)
    gains = [results[f"s{s}"]["gain"] for s in args.seeds]
    print("| model | " + " | ".join(CATEGORIES) + " | overall |")
    print("|" + "---|" * (len(CATEGORIES) + 2))
    for key in ["before", *[f"s{s}" for s in args.seeds]]:
        r = results[key]
        print(f"| {key} | " + " | ".join(f"{r['categories'][c]:.2f}" for c in CATEGORIES) + f" | {r['overall']:.3f} |")
    print(f"gain over seeds: {fmt(gains)}")
    print(f"movability: mean gain {np.mean(gains):.3f}, min gain {min(gains):.3f}")
    return results


if __name__ == "__main__":
    main()
