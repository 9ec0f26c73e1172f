"""Preference-training step throughput: pairs/s and peak memory for DPO (K=2) and RankDPO (K=4),
LoRA and full fine-tuning, on the shapes model (raypref.train.train_step, fp32 CPU, 1 worker).

    .venv/bin/python benchmarks/train_step.py                      # small model, 10 timed steps
    nice -n 19 .venv/bin/python benchmarks/train_step.py --steps 2 --warmup 0 --batch-size 4   # smoke

pairs/s counts ordered preference pairs per second: one per prompt for DPO (best vs worst), and
K(K-1)/2 per prompt for RankDPO (all pairs with distinct phi). images/s counts denoiser inputs of the
policy forward (the reference forward doubles the compute of the preference methods).
Peak memory: each configuration runs in a fresh process; ``peak_rss_delta`` is ru_maxrss after the
timed steps minus ru_maxrss after building the model and data (so it covers activations, gradients,
optimizer state and the reference), ``peak_rss`` the process's total.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import resource
import time


def _rows(n: int, k: int, resolution: int) -> list[dict]:
    from raypref.prefdata import make_row
    from raypref.shapes.grammar import CATEGORIES, sample_prompts
    from raypref.shapes.teachers import Teacher

    names = ["clean", "vellum", "prism", "quill"][:k]
    teachers = [Teacher(t, size=resolution) for t in names]
    prompts = [p for c in CATEGORIES for p in sample_prompts(c, n, 0)][:n]
    phi = [float(k - i) for i in range(k)]
    return [make_row(p, "", [t.generate([p], [i])[0] for t in teachers], names, [i] * k, ["q"], [phi], phi,
                     list(range(1, k + 1)), []) for i, p in enumerate(prompts)]


def _run(method: str, k: int, lora: bool, args, out: mp.Queue) -> None:
    import torch

    from raypref import train, train_config, train_state
    from raypref.models import SD15Adapter
    from raypref.shapes.model import build_pipeline, model_size

    torch.set_num_threads(args.threads)
    pipe = SD15Adapter(build_pipeline(args.size, seed=0))
    rows = _rows(args.batch_size, k, model_size(args.size).resolution)
    cfg = train_config.shapes_cpu()
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, lora=lora),
        loss=dataclasses.replace(cfg.loss, method=method),
        optim=dataclasses.replace(cfg.optim, batch_size=args.batch_size, warmup_steps=0, precision="fp32"),
        run=dataclasses.replace(cfg.run, num_workers=1))
    state = train_state.build_state(cfg, pipe=pipe)
    for _ in range(args.warmup):
        train.train_step(state, [rows])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for _ in range(args.steps):
        train.train_step(state, [rows])
    dt = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pairs_per_prompt = 1 if method == "dpo" else k * (k - 1) // 2
    n_images = 2 if method == "dpo" else k
    out.put({
        "method": method, "K": k, "mode": "lora" if lora else "full",
        "trainable_params": sum(p.numel() for p in state.params),
        "pairs_per_s": args.steps * args.batch_size * pairs_per_prompt / dt,
        "images_per_s": args.steps * args.batch_size * n_images / dt,
        "s_per_step": dt / args.steps,
        "peak_rss_delta_mb": (peak - base) / 1024, "peak_rss_mb": peak / 1024,  # ru_maxrss is KiB on Linux
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")  # a fresh process per configuration: clean ru_maxrss
    print(f"shapes {args.size} (latent UNet, flow), batch {args.batch_size} prompts, {args.steps} steps, "
          f"{args.threads} threads, fp32 CPU")
    print(f"{'method':8} {'K':>2} {'mode':5} {'trainable':>10} {'pairs/s':>9} {'images/s':>9} {'s/step':>7} "
          f"{'peak_rss_delta_MB':>18} {'peak_rss_MB':>12}")
    for method, k in (("dpo", 2), ("rankdpo", 4)):
        for lora in (True, False):
            q = ctx.Queue()
            p = ctx.Process(target=_run, args=(method, k, lora, args, q))
            p.start()
            r = q.get()
            p.join()
            print(f"{r['method']:8} {r['K']:>2} {r['mode']:5} {r['trainable_params']:>10} {r['pairs_per_s']:>9.2f} "
                  f"{r['images_per_s']:>9.2f} {r['s_per_step']:>7.3f} {r['peak_rss_delta_mb']:>18.1f} "
                  f"{r['peak_rss_mb']:>12.1f}")


if __name__ == "__main__":
    main()
