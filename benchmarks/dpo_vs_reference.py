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
next to DPO's. Last line: ``dpo pairs/s X`` (``rankdpo pairs/s X``).
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
    ap.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--beta", type=float, default=5000.0, help="paper convention (= 2 x diffusers' beta_dpo)")
    args = ap.parse_args(argv)
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
                                        max_steps=args.warmup + args.steps, precision="fp32"),
        run=RunSection(name="bench", num_workers=1),
    )
    state = train_state.build_state(cfg)
    print(f"[dpo_vs_reference] {args.method}: {len(rows)} rows, {args.batch_pairs} pairs a step, "
          f"{args.threads} threads, LoRA rank 4 on {', '.join(cfg.model.lora_targets)}", flush=True)
    bs = cfg.optim.batch_size
    times, phases = [], {p: 0.0 for p in PHASES}
    for step in range(args.warmup + args.steps):
        batch = [rows[(step * bs + j) % len(rows)] for j in range(bs)]
        timed = step >= args.warmup
        state.phase_seconds = {} if timed else None
        t0 = time.perf_counter()
        train.train_step(state, [batch])
        if timed:
            times.append(time.perf_counter() - t0)
            for p in PHASES:
                phases[p] += state.phase_seconds.get(p, 0.0)
    step_s = float(np.median(times))
    pairs_s = args.batch_pairs / step_s
    mean = sum(times) / len(times)
    print("| phase | ms per step | share |")
    print("|---|---|---|")
    for p in PHASES:
        ms = 1000 * phases[p] / len(times)
        print(f"| {p} | {ms:.1f} | {ms / (1000 * mean):.0%} |")
    other = 1000 * (mean - sum(phases.values()) / len(times))
    print(f"| other (loss, metrics, bookkeeping) | {other:.1f} | {other / (1000 * mean):.0%} |")
    floor = sum(phases[p] for p in ("forward_policy", "backward", "forward_reference")) / len(times)
    print(f"step {1000 * step_s:.1f} ms (median of {len(times)}), floor (policy fwd+bwd, reference fwd) "
          f"{1000 * floor:.1f} ms = {args.batch_pairs / floor:.1f} pairs/s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"{1000 * step_s / args.batch_pairs:.1f} ms per pair")
    print(f"{args.method} pairs/s {pairs_s:.2f}")
    return pairs_s


if __name__ == "__main__":
    main()
