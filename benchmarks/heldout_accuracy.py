"""Held-out implicit reward accuracy of each preference method on the shapes base model.

    .venv/bin/python benchmarks/heldout_accuracy.py --model shipped --steps 60

Preference data as Syn-Pic makes it, from the procedural teachers: per prompt, K = 4 teacher renders
(clean, prism, quill, vellum) scored by the faithfulness and aesthetic rewards; phi, ranking and
BalancedDPO consensus pairs from raypref.labels. Each method trains a LoRA on the training prompts;
accuracy is measured on held-out prompts (pair (w, l) correct when the policy's implicit reward
prefers w), best-vs-worst pairs for dpo/rankdpo/sft and consensus pairs for balanced.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from raypref import heldout, train, train_config, train_state
from raypref.labels import consensus_pairs, ranking, synpic_phi
from raypref.prefdata import make_row
from raypref.shapes.grammar import CATEGORIES, sample_prompts
from raypref.shapes.score import aesthetic, faithfulness
from raypref.shapes.teachers import Teacher

TEACHERS = ("clean", "prism", "quill", "vellum")


def synpic_rows(prompts: list[str], seed: int) -> list[dict]:
    teachers = [Teacher(t) for t in TEACHERS]
    rows = []
    for i, p in enumerate(prompts):
        s = seed * 100_000 + i
        images = [t.generate([p], [s])[0] for t in teachers]
        scores = np.array([[faithfulness(p, im) for im in images], [aesthetic(im) for im in images]])
        phi = synpic_phi(scores)
        if phi.max() == phi.min():
            continue  # all equal: no preference to learn or to test
        from raypref.shapes.grammar import parse

        rows.append(make_row(p, parse(p).category, images, [f"teacher:{t}" for t in TEACHERS], [s] * 4,
                             ["faithfulness", "aesthetic"], scores, phi, ranking(phi), consensus_pairs(scores)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="shipped")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-train", type=int, default=20, help="prompts per category for training")
    ap.add_argument("--n-test", type=int, default=8, help="prompts per category held out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_prompts = [p for c in CATEGORIES for p in sample_prompts(c, args.n_train, seed=11)]
    test_prompts = [
        p for c in CATEGORIES for p in sample_prompts(c, args.n_test, seed=12) if p not in set(train_prompts)
    ]
    train_rows, test_rows = synpic_rows(train_prompts, 1), synpic_rows(test_prompts, 2)
    print(f"{len(train_rows)} training rows, {len(test_rows)} held-out rows (K = 4, 2 rewards)")
    print("| method | steps | held-out pairs | accuracy before | accuracy after | margin after | s |")
    print("|---|---|---|---|---|---|---|")
    for method in train_config.METHODS:
        cfg = train_config.shapes_cpu()
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, path=args.model, lora=True),
            loss=dataclasses.replace(cfg.loss, method=method),
            optim=dataclasses.replace(cfg.optim, lr=args.lr, batch_size=args.batch_size, warmup_steps=5,
                                      max_steps=args.steps))
        state = train_state.build_state(cfg)
        pairs = "consensus" if method == "balanced" else "best_worst"
        before = heldout.heldout_accuracy(state, test_rows, n_draws=8, pairs=pairs)
        t0 = time.time()
        rows = train_rows if method != "balanced" else [r for r in train_rows if r["pairs"]]
        for step in range(args.steps):
            k = (step * args.batch_size) % len(rows)
            train.train_step(state, [(rows + rows)[k:k + args.batch_size]])
        after = heldout.heldout_accuracy(state, test_rows, n_draws=8, pairs=pairs)
        print(f"| {method} | {args.steps} | {after['pairs']} | {before['accuracy']:.3f} | {after['accuracy']:.3f} "
              f"| {after['margin']:.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
