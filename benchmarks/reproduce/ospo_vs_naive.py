"""OSPO pairs vs naive pairs at equal pair count (issue 7; the OSPO row of the paper reproductions).

One round from the same starting model: build OSPO pairs (one object binding perturbed, same
seeds, VQA-filtered) and naive pairs (two random samples of the same prompt ranked by the same VQA
judge), cut both to the same number of pairs (seeded), train the same LoRA Diffusion-DPO on each
(jobs/train_preference.py's trainer, adapter folded into a full pipeline), and ShapesEval the
start, the naive and the OSPO model on the same prompts and seeds. Prints one markdown table and
writes every eval set under --out (manifest.jsonl + PNGs, re-scorable).

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/reproduce/ospo_vs_naive.py --model shipped \
        --out outputs/ospo_vs_naive --steps 60 --n-per-category 30 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raypref import ospo as O  # noqa: E402
from raypref import train as T  # noqa: E402
from raypref.config import merge  # noqa: E402
from raypref.generators import PipelineGenerator, resolve_checkpoint  # noqa: E402
from raypref.prefdata import to_table  # noqa: E402
from raypref.shapes.evaluate import run_eval  # noqa: E402


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(cfg: O.OSPOConfig) -> list[dict]:
    scorer = O.VQAScorer(cfg.judge.backend, cfg.filter.yes_threshold, **cfg.judge.kwargs())
    rows, _, summary = _job("build_ospo").build_round(cfg, cfg.generate.generator, scorer)
    print(json.dumps({"mode": cfg.run.mode, **{k: v for k, v in summary.items() if not isinstance(v, list)}},
                     default=str), flush=True)
    return rows


def train(rows: list[dict], base: str, out: Path, args, name: str) -> Path:
    data = out / f"{name}.parquet"
    pq.write_table(to_table(rows), data)
    cfg = merge(T.shapes_cpu(), {
        "model": {"path": base, "lora": True, "lora_rank": 16, "lora_alpha": 16.0},
        "data": {"path": str(data)},
        "loss": {"method": "dpo", "sft_weight": args.sft_weight},
        "optim": {"lr": args.lr, "max_steps": args.steps, "batch_size": 16, "warmup_steps": 5},
        "run": {"name": f"ospo-vs-naive-{name}-{args.seed}", "storage_path": str(out / "ray"), "num_workers": 1,
                "cpus_per_worker": 1.0, "checkpoint_every": args.steps, "keep_checkpoints": 1, "export_dir": ""},
    })
    result = _job("train_preference").build_trainer(cfg).fit()
    model = out / f"{name}_model"
    with result.checkpoint.as_directory() as d:
        T.write_full_model(d, cfg, str(model))
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shipped", help="starting checkpoint ('shipped' or a pipeline dir)")
    ap.add_argument("--out", default="outputs/ospo_vs_naive")
    ap.add_argument("--per-category", type=int, default=16, help="OSPO/naive prompts per category")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--sft-weight", type=float, default=500.0)
    ap.add_argument("--n-per-category", type=int, default=30, help="ShapesEval prompts per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-steps", type=int, default=20)
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=4, ignore_reinit_error=True)
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = str(resolve_checkpoint(args.model))
    t0 = time.time()
    cfg = O.shapes_cpu()
    cfg = dataclasses.replace(
        cfg, prompts=dataclasses.replace(cfg.prompts, per_category=args.per_category, seed=args.seed),
        generate=dataclasses.replace(cfg.generate, generator=f"checkpoint:{base}", seed=args.seed,
                                     num_inference_steps=args.sample_steps),
        run=dataclasses.replace(cfg.run, output=str(out / "ospo.parquet"), use_ray="always"))
    ospo_rows = build(cfg)
    naive_rows = build(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, mode="naive")))
    n = min(len(ospo_rows), len(naive_rows))
    rng = random.Random(args.seed)
    ospo_rows, naive_rows = rng.sample(ospo_rows, n), rng.sample(naive_rows, n)
    models = {"start": Path(base), "naive": train(naive_rows, base, out, args, "naive"),
              "ospo": train(ospo_rows, base, out, args, "ospo")}
    table = {}
    for name, path in models.items():
        gen = PipelineGenerator(str(path), num_inference_steps=args.sample_steps, guidance_scale=3.0)
        table[name] = run_eval(gen, args.n_per_category, args.seed, out / f"eval_{name}")
    cats = list(table["start"]["categories"])
    lines = [f"pairs per arm: {n}; {args.steps} DPO steps (LoRA, lr {args.lr}, sft_weight {args.sft_weight}); "
             f"ShapesEval {args.n_per_category} per category, seed {args.seed}; {time.time() - t0:.0f} s",
             "", "| model | " + " | ".join(cats) + " | overall |", "|---" * (len(cats) + 2) + "|"]
    for name, s in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['categories'][c]:.3f}" for c in cats) + f" | {s['overall']:.3f} |")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return table


if __name__ == "__main__":
    main()
