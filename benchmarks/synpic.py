"""Syn-Pic throughput: the whole Ray pipeline against a plain single-process loop, same generators and rewards.

Full benchmark (all 201 grammar prompts, the shapes_cpu preset's 4 teachers + the shipped model,
4 rewards, a 2-CPU local Ray; run on an idle machine):

    env RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/synpic.py --preset shapes_cpu --checkpoint shipped \
        --n-per-category 135 --model-pool-sizes 1 2 --loop-threads 1 2 --num-cpus 2 --actor-cpus 0.09

``--model-pool-sizes`` sets the actors of the model generator's pool (the stage that costs ~100x the
others per image; every other pool keeps one actor); ``--pool-sizes`` instead widens every pool.
The loop runs once per ``--loop-threads`` torch thread count (a Ray actor with a fractional CPU runs
one thread).

Smoke run (seconds of work, random tiny model):

    nice -n 19 env RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 .venv/bin/python benchmarks/synpic.py \
        --preset tiny_test --checkpoint random-tiny --n-per-category 2 --pool-sizes 1

``--checkpoint`` is a pipeline dir, "shipped", "random-tiny"/"random-small" (a random-weight shapes
model saved to a temp dir) or "none" (teachers only). Prints one markdown table: images/s of the
plain loop (model loading excluded, and included), and of the Ray pipeline per pool size (actor start-up
included, since that is what a run pays; the steady-state rate is higher on long runs).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from raypref import labels, prefdata, synpic


def plain_loop(cfg: synpic.SynPicConfig, prompts: list[tuple[str, str]]) -> tuple[float, float, int]:
    """Everything the pipeline does, in one process: (seconds excluding loading, including, images)."""
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
    return t2 - t1, t2 - t0, n_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny_test", choices=sorted(synpic.PRESETS))
    ap.add_argument("--checkpoint", default="random-tiny")
    ap.add_argument("--n-per-category", type=int, default=2)
    ap.add_argument("--pool-sizes", type=int, nargs="*", default=[], help="widen every pool to each size in turn")
    ap.add_argument("--model-pool-sizes", type=int, nargs="*", default=[1, 2],
                    help="actors of the checkpoint generator's pool, in turn (other pools keep one)")
    ap.add_argument("--loop-threads", type=int, nargs="+", default=[1], help="torch threads of the plain loop")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--actor-cpus", type=float, default=0.1, help="CPUs reserved per actor")
    ap.add_argument("--steps", type=int, default=0, help="sampling steps of the checkpoint (0: the preset's)")
    args = ap.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="synpic-bench-"))
    cfg = synpic.PRESETS[args.preset]()
    specs = [s for s in cfg.generators.specs if not s.startswith("checkpoint:")]
    if args.checkpoint.startswith("random-"):
        from raypref.shapes.model import build_pipeline

        build_pipeline(args.checkpoint.split("-", 1)[1]).save_pretrained(tmp / "base")
        specs.append(f"checkpoint:{tmp / 'base'}")
    elif args.checkpoint != "none":
        specs.append(f"checkpoint:{args.checkpoint}")
    gen = replace(cfg.generators, specs=tuple(specs), num_cpus=args.actor_cpus,
                  num_inference_steps=args.steps or cfg.generators.num_inference_steps)
    cfg = replace(cfg, generators=gen, prompts=replace(cfg.prompts, n_per_category=args.n_per_category),
                  rewards=replace(cfg.rewards, num_cpus=args.actor_cpus),
                  run=replace(cfg.run, progress=False, window_chunks=0,
                              chunk_size=max(gen.batch_size, math.ceil(args.n_per_category * 6 / 4))))
    prompts, _ = synpic.load_prompts(cfg.prompts, synpic.needs_grammar(cfg))
    print(f"{len(prompts)} prompts x {len(specs)} generators ({', '.join(specs)}), rewards {list(cfg.rewards.keys)}")

    import torch

    rows = []
    for threads in args.loop_threads:
        torch.set_num_threads(threads)
        loop_s, loop_total_s, n = plain_loop(cfg, prompts)
        rows.append((f"plain loop, {threads} thread(s) (loading excluded)", n, loop_s))
        rows.append((f"plain loop, {threads} thread(s) (loading included)", n, loop_total_s))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    variants = [(f"Ray pipeline, {n} actor(s) in every pool", replace(cfg.generators, pool_size=n),
                 replace(cfg.rewards, pool_size=n)) for n in args.pool_sizes]
    is_model = [s.startswith("checkpoint:") for s in specs]
    if any(is_model):
        variants += [(f"Ray pipeline, {n} model-generator actor(s), 1 per other pool",
                      replace(cfg.generators, pool_size=1, pool_sizes=tuple(n if m else 1 for m in is_model)),
                      replace(cfg.rewards, pool_size=1)) for n in args.model_pool_sizes]
    for i, (name, g, r) in enumerate(variants):
        c = replace(cfg, generators=g, rewards=r, run=replace(cfg.run, output_dir=str(tmp / f"ray-{i}")))
        t0 = time.time()
        s = synpic.run(c)
        rows.append((name, s["this_run"]["images"], time.time() - t0))
    ray.shutdown()

    print("| run | images | seconds | images/s |\n|---|---|---|---|")
    for name, images, secs in rows:
        print(f"| {name} | {images} | {secs:.1f} | {images / secs:.2f} |")


if __name__ == "__main__":
    main()
