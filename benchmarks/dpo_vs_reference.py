"""raypref's Diffusion-DPO step on the reference script's setting: pairs/s and where the time goes.

    .venv/bin/python benchmarks/dpo_vs_reference.py                    # DPO, 30 timed steps
    .venv/bin/python benchmarks/dpo_vs_reference.py --method rankdpo   # K = 4 rows grouped per caption

The model and data are ``../shared/bench/make_tiny_sd.py``'s: a stock StableDiffusionPipeline (UNet
32/64, VAE 32/64 with 4 latent channels, CLIP text 32-d, DDPM epsilon) and 256 Pick-a-Pic-layout
pairs of 64 x 64 PNGs. The setting is the one diffusers' research script
(``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py --rank 4 --train_batch_size 8
--resolution 64``) reached 5.6 pairs/s with on this machine: LoRA rank 4 on the UNet's attention
projections (to_q, to_k, to_v, to_out.0), 8 pairs a step, fp32, one process. The loss is the same
sigmoid DPO; beta here is the paper's convention, ``beta = 2 * beta_dpo`` of diffusers' script
(2 x 2500 = 5000). Rows come through ``raypref.pickapic.to_rows`` (the import path of
``data.format=pickapic``) and the step is ``raypref.train.train_step``.

Per step it times the phases ``train_step`` reports (data: PNG decoding and row selection; encode:
VAE and text encoder; forward_reference; forward_policy; backward; optimizer); the floor is one
policy forward + backward and one reference forward. RankDPO K = 4 groups four pairs' images of one
caption (as ``raypref prefs convert`` would for a consistent ranking) and prints its cost per pair
next to DPO's.

Two trainers, timed on alternating steps so that both see the same machine (a shared 2-core VM
drifts by 10 % within minutes): one decodes and VAE-encodes every image at every step (any first
epoch, and every epoch with ``data.cache=rows``, as the reference script does); the other runs the
epochs after the first with training's default ``data.cache=latents``, which reuses each image's
latents (exact: the VAE is frozen and x0 its posterior mean), so its step is the floor plus text
encoding. A preference run trains several epochs (Diffusion-DPO: 2,000 steps of 2,048 pairs over
851k pairs, 4.8 epochs). Last line: ``dpo pairs/s X`` (``rankdpo pairs/s X``), the cached trainer.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MAKE = HERE.parent.parent / "shared" / "bench" / "make_tiny_sd.py"
PHASES = ("data", "encode", "forward_reference", "forward_policy", "backward", "optimizer")


def build(work: Path, n_pairs: int) -> tuple[Path, Path]:
    if not (work / "pipe" / "model_index.json").exists():
        subprocess.run([sys.executable, str(MAKE), str(work), str(n_pairs)], check=True)
    return work / "pipe", work / "data" / "train.parquet"


def rank_rows(rows: list[dict], k: int = 4) -> list[dict]:
    """Groups of k/2 pairs as one K = k ranking row (winners above losers), the RankDPO layout."""
    out = []
    for i in range(0, len(rows) - k // 2 + 1, k // 2):
        group = rows[i:i + k // 2]
        images, phi = [], []
        for r in group:
            p = r["pairs"][0]
            images += [r["images"][p["i"]], r["images"][p["j"]]]
            phi += [1.0, 0.0]
        out.append({"prompt_id": group[0]["prompt_id"], "prompt": group[0]["prompt"], "images": images,
                    "generators": [f"pickapic:{j}" for j in range(k)], "phi": phi, "pairs": []})
    return out


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/raypref-tiny-sd", help="where make_tiny_sd.py writes (reused)")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--method", choices=["dpo", "rankdpo"], default="dpo")
    ap.add_argument("--batch-pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30, help="timed steps of each trainer")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of the re-encoding trainer")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--beta", type=float, default=5000.0, help="paper convention (= 2 x diffusers' beta_dpo)")
    args = ap.parse_args(argv)
    import dataclasses

    import pyarrow.parquet as pq
    import torch

    from raypref import pickapic, train, train_config, train_state
    from raypref.raytrain import RunSection

    torch.set_num_threads(args.threads)
    pipe_dir, data = build(Path(args.work), args.pairs)
    rows = pickapic.to_rows(pq.read_table(data)).to_pylist()
    per_row = 1
    if args.method == "rankdpo":
        rows, per_row = rank_rows(rows), 2  # a K = 4 row holds two of the script's pairs
    cfg = train_config.TrainConfig(
        model=train_config.ModelSection(path=str(pipe_dir), lora=True, lora_rank=4, lora_alpha=4.0),
        data=train_config.DataSection(path=str(data), format="pickapic"),
        loss=train_config.LossSection(method=args.method, beta=args.beta),
        optim=train_config.OptimSection(lr=1e-5, warmup_steps=0, batch_size=args.batch_pairs // per_row,
                                        max_steps=10**6, precision="fp32"),
        run=RunSection(name="bench", num_workers=1),
    )
    bs = cfg.optim.batch_size
    epoch = len(rows) // bs  # steps in one pass over the rows
    cached = train_state.build_state(cfg)  # data.cache=latents, the default
    fresh = train_state.build_state(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache="rows")))
    print(f"[dpo_vs_reference] {args.method}: {len(rows)} rows, {args.batch_pairs} pairs a step, "
          f"{args.threads} threads, LoRA rank 4 on {', '.join(cfg.model.lora_targets)}", flush=True)
    steps = {"cached": epoch, "fresh": 0}

    def step(state, name, timing):
        state.phase_seconds = {} if timing is not None else None
        i = steps[name]
        t0 = time.perf_counter()
        train.train_step(state, [[rows[(i * bs + j) % len(rows)] for j in range(bs)]])
        steps[name] += 1
        if timing is not None:
            timing["s"].append(time.perf_counter() - t0)
            for p in PHASES:
                timing[p] = timing.get(p, 0.0) + state.phase_seconds.get(p, 0.0)

    for _ in range(epoch):  # the first epoch fills the latent cache
        step(cached, "cached", None)
    for _ in range(args.warmup):
        step(fresh, "fresh", None)
    timings = {"fresh": {"s": []}, "cached": {"s": []}}
    for _ in range(args.steps):  # alternating, so both see the same machine
        step(fresh, "fresh", timings["fresh"])
        step(cached, "cached", timings["cached"])
    out = {}
    for name, label in (("fresh", "every image decoded and VAE-encoded each step (the first epoch; "
                                  "every epoch with data.cache=rows, as the reference script)"),
                        ("cached", "epochs after the first with data.cache=latents (the default)")):
        t = timings[name]
        n, step_s = len(t["s"]), float(np.median(t["s"]))
        mean = sum(t["s"]) / n
        print(f"{label}:")
        print("| phase | ms per step | share |")
        print("|---|---|---|")
        for p in PHASES:
            ms = 1000 * t.get(p, 0.0) / n
            print(f"| {p} | {ms:.1f} | {ms / (1000 * mean):.0%} |")
        other = 1000 * (mean - sum(t.get(p, 0.0) for p in PHASES) / n)
        print(f"| other (loss, metrics, bookkeeping) | {other:.1f} | {other / (1000 * mean):.0%} |")
        floor = sum(t.get(p, 0.0) for p in ("forward_policy", "backward", "forward_reference")) / n
        print(f"step {1000 * step_s:.1f} ms (median of {n}), floor (policy fwd+bwd, reference fwd) "
              f"{1000 * floor:.1f} ms = {args.batch_pairs / floor:.1f} pairs/s; "
              f"{1000 * step_s / args.batch_pairs:.1f} ms per pair", flush=True)
        out[name] = args.batch_pairs / step_s
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (both trainers)")
    print(f"{args.method} pairs/s, re-encoding every step {out['fresh']:.2f}")
    print(f"{args.method} pairs/s {out['cached']:.2f}")
    return out["cached"]


if __name__ == "__main__":
    main()
