"""Syn-Pic throughput: the whole Ray pipeline against a plain single-process loop, same generators and rewards.

Full benchmark (all 201 grammar prompts, the shapes_cpu preset's 4 teachers + the shipped model,
4 rewards, a 2-CPU local Ray; run on an idle machine):

    env RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/synpic.py --preset shapes_cpu --checkpoint shipped \
        --n-per-category 135 --model-pool-sizes 1 2 --fused-pool-sizes 1 2 --loop-threads 1 2 \
        --num-cpus 2 --actor-cpus 0.09

``--model-pool-sizes`` sets the actors of the model generator's pool (the stage that costs ~100x the
others per image; every other pool keeps one actor) in the pools layout; ``--pool-sizes`` instead
widens every pool; ``--fused-pool-sizes`` runs ``run.layout=fused`` (one pool, each actor running
every generator and reward) with that many actors. The loop runs once per ``--loop-threads`` torch
thread count, each in a fresh process so that its figure includes importing torch/diffusers and
loading every model, as the actors' start-up does (a Ray actor with a fractional CPU runs one thread).

Smoke run (seconds of work, random tiny model):

    nice -n 19 env RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synpic.py \
        --preset tiny_test --checkpoint random-tiny --n-per-category 2 --pool-sizes 1

``--checkpoint`` is a pipeline dir, "shipped", "random-tiny"/"random-small" (a random-weight shapes
model saved to a temp dir) or "none" (teachers only). Prints one markdown table: images/s of the
plain loop (from process start, and with imports and model loading excluded), and of the Ray pipeline
per layout and pool size (actor start-up included, since that is what a run pays; the local cluster's
own start is printed apart, as a cluster is normally running already).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from raypref import labels, prefdata, synpic


def plain_loop(cfg: synpic.SynPicConfig, prompts: list[tuple[str, str]]) -> tuple[float, float, int]:
    """Everything the pipeline does, in one process: (seconds of the loop, seconds of imports and loading,
    images)."""
    from raypref.generators import build_generator
    from raypref.rewards import build_reward

    t0 = time.time()
    g = cfg.generators
    gens = [build_generator(s, **synpic.generator_options(g, s.partition(":")[0])) for s in g.specs]
    rewards = []
    for spec in cfg.rewards.specs:
        key, _, path = spec.partition(":")
        rewards.append(build_reward(key, name=key, **({"model_path": path} if path else {})))
    t1 = time.time()
    n_images = 0
    bs = g.batch_size
    for b in range(0, len(prompts), bs):
        batch = prompts[b:b + bs]
        texts = [p for p, _ in batch]
        pids = [prefdata.prompt_id(p) for p in texts]
        seeds = np.array([[synpic.derive_seed(pid, s, g.seed) for pid in pids] for s in g.specs])  # [K, B]
        images = [gen({"prompt": texts, "seed": sd})["image"] for gen, sd in zip(gens, seeds)]
        n_images += len(texts) * len(gens)
        scores = np.stack([np.stack([r({"prompt": np.array(texts), "image": im})[f"score_{r.name}"] for im in images])
                           for r in rewards])  # [n, K, B]
        for i, (p, cat) in enumerate(batch):
            s = scores[:, :, i].astype(np.float64)
            phi = labels.synpic_phi(s)
            prefdata.make_row(p, cat, [im[i] for im in images], g.specs, seeds[:, i], cfg.rewards.keys, s, phi,
                              labels.ranking(phi), labels.consensus_pairs(s))
    t2 = time.time()
    return t2 - t1, t1 - t0, n_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_test", choices=sorted(synpic.PRESETS))
    ap.add_argument("--checkpoint", default="random-tiny")
    ap.add_argument("--n-per-category", type=int, default=2)
    ap.add_argument("--pool-sizes", type=int, nargs="*", default=[], help="widen every pool to each size in turn")
    ap.add_argument("--model-pool-sizes", type=int, nargs="*", default=[1, 2],
                    help="actors of the checkpoint generator's pool, in turn (other pools keep one)")
    ap.add_argument("--fused-pool-sizes", type=int, nargs="*", default=[1, 2],
                    help="actors of the one pool of run.layout=fused, in turn")
    ap.add_argument("--loop-threads", type=int, nargs="+", default=[1], help="torch threads of the plain loop")
    ap.add_argument("--loop-only", type=int, default=0, help=argparse.SUPPRESS)  # child: run the loop, print JSON
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--actor-cpus", type=float, default=0.1, help="CPUs reserved per actor")
    ap.add_argument("--steps", type=int, default=0, help="sampling steps of the checkpoint (0: the preset's)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="synpic-bench-"))
    cfg = synpic.PRESETS[args.preset]()
    specs = [s for s in cfg.generators.specs if not s.startswith("checkpoint:")]
    checkpoint = args.checkpoint
    if checkpoint.startswith("random-"):
        from raypref.shapes.model import build_pipeline

        build_pipeline(checkpoint.split("-", 1)[1]).save_pretrained(tmp / "base")
        checkpoint = str(tmp / "base")
    if checkpoint != "none":
        specs.append(f"checkpoint:{checkpoint}")
    gen = replace(cfg.generators, specs=tuple(specs), num_cpus=args.actor_cpus,
                  num_inference_steps=args.steps or cfg.generators.num_inference_steps)
    cfg = replace(cfg, generators=gen, prompts=replace(cfg.prompts, n_per_category=args.n_per_category),
                  rewards=replace(cfg.rewards, num_cpus=args.actor_cpus),
                  run=replace(cfg.run, progress=False, window_chunks=0,
                              chunk_size=max(gen.batch_size, math.ceil(args.n_per_category * 6 / 4))))
    prompts, _ = synpic.load_prompts(cfg.prompts, synpic.needs_grammar(cfg))
    if args.loop_only:
        import torch

        torch.set_num_threads(args.loop_only)
        print(json.dumps(dict(zip(("loop_s", "loading_s", "images"), plain_loop(cfg, prompts)))))
        return
    print(f"{len(prompts)} prompts x {len(specs)} generators ({', '.join(specs)}), rewards {list(cfg.rewards.keys)}")

    rows = []
    for threads in args.loop_threads:  # a fresh process each: imports and model loading count, as for actors
        cmd = [sys.executable, __file__, "--preset", args.preset, "--checkpoint", checkpoint, "--n-per-category",
               str(args.n_per_category), "--steps", str(gen.num_inference_steps), "--loop-only", str(threads)]
        t0 = time.time()
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        wall = time.time() - t0
        rows.append((f"plain loop, {threads} thread(s), process start to end", out["images"], wall))
        rows.append((f"plain loop, {threads} thread(s), imports and loading excluded", out["images"], out["loop_s"]))

    import ray
    from ray.data import DataContext

    t0 = time.time()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    print(f"local Ray cluster start: {time.time() - t0:.1f} s (not in the Ray rows)")
    DataContext.get_current().enable_progress_bars = False
    pools = replace(cfg.run, layout="pools")
    variants = [(f"Ray pools, {n} actor(s) in every pool", replace(cfg.generators, pool_size=n),
                 replace(cfg.rewards, pool_size=n), pools) for n in args.pool_sizes]
    is_model = [s.startswith("checkpoint:") for s in specs]
    if any(is_model):
        variants += [(f"Ray pools, {n} model-generator actor(s), 1 per other pool",
                      replace(cfg.generators, pool_size=1, pool_sizes=tuple(n if m else 1 for m in is_model)),
                      replace(cfg.rewards, pool_size=1), pools) for n in args.model_pool_sizes]
    variants += [(f"Ray fused, {n} actor(s)", replace(cfg.generators, pool_size=n), cfg.rewards,
                  replace(cfg.run, layout="fused")) for n in args.fused_pool_sizes]
    for i, (name, g, r, run) in enumerate(variants):
        c = replace(cfg, generators=g, rewards=r, run=replace(run, output_dir=str(tmp / f"ray-{i}")))
        t0 = time.time()
        s = synpic.run(c)
        rows.append((name, s["this_run"]["images"], time.time() - t0))
    ray.shutdown()

    print("| run | images | seconds | images/s |\n|---|---|---|---|")
    for name, images, secs in rows:
        print(f"| {name} | {images} | {secs:.1f} | {images / secs:.2f} |")


if __name__ == "__main__":
    main()
