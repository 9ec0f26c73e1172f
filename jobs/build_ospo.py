"""Build OSPO preference pairs (raypref.ospo) - or the naive-pairs baseline - and optionally run
self-improving rounds (build -> DPO -> the trained model builds the next round's pairs).

    python jobs/build_ospo.py                                   # preset shapes_cpu: shipped base model
    python jobs/build_ospo.py --preset tiny_test run.output=/tmp/ospo.parquet
    python jobs/build_ospo.py run.mode=naive run.output=/tmp/naive.parquet       # the comparison
    python jobs/build_ospo.py run.rounds=2 --train-preset shapes_cpu --train-method dpo
    ray job submit --working-dir . -- python jobs/build_ospo.py --config my.yaml run.use_ray=always

Config: preset -> YAML (--config) -> section.key=value overrides. Rendering and VQA run in Ray Data
(``map_batches`` with fixed actor pools and fractional CPUs) when there are at least
``run.ray_min_images`` images (or ``run.use_ray=always``), plainly otherwise; both give the same
rows. Writes ``run.output`` (Parquet, raypref.prefdata layout), ``<output>.records.jsonl`` (one
record per perturbation: base, perturbed, operation, binding, kept slot, drop reasons) and
``<output>.summary.json`` (counts per operation, filtered-out counts with reasons).

Rounds: round r's rows go to ``<output stem>.round{r}.parquet``; ``jobs/train_preference.py``'s
trainer trains on them (LoRA by default, folded into a full pipeline; or full fine-tuning with
``--train-override model.lora=false``) and writes ``<output dir>/ospo_round{r}_model``, which
generates round r + 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raypref.config import job_parser, load_config, to_dict
from raypref.generators import GENERATORS, build_generator, resolve_checkpoint
from raypref.ospo import PRESETS, OSPOConfig, VQAScorer, build_pairs, ospo_rounds, plan
from raypref.prefdata import to_table
from raypref.train import write_full_model


def generator_kwargs(cfg: OSPOConfig, spec: str) -> dict:
    if spec.startswith("checkpoint:"):
        return {"num_inference_steps": cfg.generate.num_inference_steps, "guidance_scale": cfg.generate.guidance_scale}
    return {}


def use_ray(cfg: OSPOConfig, n_images: int) -> bool:
    return cfg.run.use_ray == "always" or (cfg.run.use_ray == "auto" and n_images >= cfg.run.ray_min_images)


def ray_results(cfg: OSPOConfig, items: list[dict]) -> dict:
    """Render and score ``items`` with Ray Data: two actor pools (generator, judge) with fractional
    CPUs. Returns {(prompt, seed, question_prompt): {"image", "score", "any_yes", "all_yes"}}."""
    import ray
    from ray.data import ActorPoolStrategy

    kind, _, arg = cfg.generate.generator.partition(":")
    if kind not in GENERATORS or not arg:
        raise ValueError(f"bad generator spec {cfg.generate.generator!r}")
    pool = lambda: ActorPoolStrategy(size=cfg.run.num_actors)  # noqa: E731
    ds = ray.data.from_items(items).map_batches(
        GENERATORS[kind], fn_constructor_args=(arg,),
        fn_constructor_kwargs=generator_kwargs(cfg, cfg.generate.generator),
        compute=pool(), num_cpus=cfg.run.cpus_per_actor, batch_size=cfg.run.batch_size, batch_format="numpy",
    ).map_batches(
        VQAScorer, fn_constructor_kwargs={"backend": cfg.judge.backend, "yes_threshold": cfg.filter.yes_threshold,
                                          **cfg.judge.kwargs()},
        compute=pool(), num_cpus=cfg.run.cpus_per_actor, batch_size=cfg.run.batch_size, batch_format="numpy",
    )
    out = {}
    for r in ds.take_all():
        out[(str(r["prompt"]), int(r["seed"]), str(r["question_prompt"]))] = {
            "image": np.asarray(r["image"], dtype=np.uint8), "score": float(r["score"]),
            "any_yes": bool(r["any_yes"]), "all_yes": bool(r["all_yes"]),
        }
    return out


def build_round(cfg: OSPOConfig, spec: str, scorer: VQAScorer):
    """(rows, records, summary) of one build, with Ray Data or plainly."""
    _, _, items = plan(cfg, scorer.judge)
    if use_ray(cfg, len(items)):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))  # a running cluster if any, else a local one
        return build_pairs(cfg, None, scorer, results=ray_results(cfg, items))
    return build_pairs(cfg, build_generator(spec, **generator_kwargs(cfg, spec)), scorer)


def write_outputs(path: str | Path, rows: list[dict], records: list[dict], summary: dict) -> dict:
    """Parquet + records JSONL + summary JSON; returns the summary with the written paths."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(rows), path)
    rec_path, sum_path = path.with_suffix(".records.jsonl"), path.with_suffix(".summary.json")
    rec_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {**summary, "rows": len(rows), "parquet": str(path), "records": str(rec_path)}
    sum_path.write_text(json.dumps(summary, indent=1))
    return summary


def _load_train_job():
    path = Path(__file__).resolve().parent / "train_preference.py"
    spec = importlib.util.spec_from_file_location("train_preference_job", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_trainer(cfg: OSPOConfig, preset: str, method: str, extra: list[str]):
    """``train(rows, model_spec, r) -> next model spec`` over jobs/train_preference.py's main."""
    out = Path(cfg.run.output).expanduser()

    def train(rows, model, r):
        data = out.with_name(f"{out.stem}.round{r}.parquet")
        pq.write_table(to_table(rows), data)
        if not model.startswith("checkpoint:"):
            raise ValueError(f"only checkpoint:... models can be trained, got {model!r}")
        export = out.parent / f"ospo_round{r}_model"
        base = str(resolve_checkpoint(model.partition(":")[2]))
        job = _load_train_job()
        cfg = job.parse_config(["--preset", preset, "--method", method, f"data.path={data}", f"model.path={base}",
                                f"run.name=ospo-round{r}", "run.export_dir=", *extra])
        result = job.build_trainer(cfg).fit()
        with result.checkpoint.as_directory() as d:  # LoRA folded in: the next round generates with it
            write_full_model(d, cfg, str(export))
        return f"checkpoint:{export}"

    return train


def main(argv: list[str] | None = None) -> dict:
    parser = job_parser(__doc__, PRESETS)
    parser.add_argument("--train-preset", default="shapes_cpu", help="train_preference preset (rounds > 1)")
    parser.add_argument("--train-method", default="dpo", help="dpo | rankdpo (K = 2) | balanced")
    parser.add_argument("--train-override", action="append", default=[], help="section.key=value for training")
    args = parser.parse_args(argv)
    cfg = load_config(PRESETS[args.preset](), args.config, args.overrides)
    print(json.dumps(to_dict(cfg), indent=1))
    scorer = VQAScorer(cfg.judge.backend, cfg.filter.yes_threshold, **cfg.judge.kwargs())

    if cfg.run.rounds == 1:
        rows, records, summary = build_round(cfg, cfg.generate.generator, scorer)
        summary = write_outputs(cfg.run.output, rows, records, summary)
    else:
        if cfg.run.mode != "ospo":
            raise ValueError("run.rounds > 1 is OSPO self-improvement; use run.mode=ospo")
        train = make_trainer(cfg, args.train_preset, args.train_method, args.train_override)
        history = ospo_rounds(cfg, cfg.generate.generator, lambda spec: spec, scorer, train,
                              build=lambda c, spec, s: build_round(c, spec, s))
        summary = {"rounds": history, "final_model": history[-1]["trained"]}
        Path(cfg.run.output).expanduser().with_suffix(".summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
