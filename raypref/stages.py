"""The evolve driver's stages. Each is ``stage(cfg, ctx, stage_dir) -> stats``: it runs one step of a
round from what ``ctx`` holds (the round, its starting checkpoint, the earlier stages' stats, the
served judge) and returns JSON-able stats; ``stats["spent"]`` is what the call itself paid
(teacher calls and cost, judge calls) and ``stats["model"]`` the pipeline a training stage wrote.

    (a) director   EvolveDirector curation (``raypref.director.curate``) with the checkpoint as the
                   base model and the served judge; the set is written as SFT data.
    (b) sft        fine-tuning (LoRA or full) on the curated set (``raypref.train``).
    (c) prefs      preference data of the SFT model: Syn-Pic ranking (``raypref.synpic``) or OSPO pairs
                   (``raypref.ospo``).
    (d) train      dpo | rankdpo | balanced from the SFT model -> the round's checkpoint.
    (e) eval       ShapesEval of the new checkpoint plus the report's fixed samples.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from raypref import director, ospo, synpic, train, train_state
from raypref.config import merge
from raypref.evolve_config import EvolveConfig
from raypref.files import atomic_write_json
from raypref.spend import MeteredGenerator, MeteredJudge, PaidLedger

NO_SPEND = {"teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}


@dataclass
class RoundContext:
    """What a stage of round ``r`` may read: the run directory, the round's starting checkpoint, the
    served judge (started on first use) and the stats of the round's earlier stages."""

    run_dir: Path
    r: int
    ckpt: Path
    judge: object = None  # a raypref.served_judge.ServedJudge (``get()`` starts it)
    stats: dict = field(default_factory=dict)
    paid: PaidLedger | None = None  # the run's spend.jsonl: stages pay teacher and judge calls as they return


def checkpoint_resolution(path) -> int:
    """Image size a saved pipeline generates: its denoiser's sample size times the VAE's downsampling
    (2 ** (len(block_out_channels) - 1), as diffusers' pipelines compute it; 1 without a VAE)."""
    from raypref.checkpoints import resolve_checkpoint

    p = resolve_checkpoint(path)
    vae = p / "vae" / "config.json"
    factor = 2 ** (len(json.loads(vae.read_text())["block_out_channels"]) - 1) if vae.exists() else 1
    for sub in ("transformer", "unet"):
        f = p / sub / "config.json"
        if f.exists():
            size = json.loads(f.read_text()).get("sample_size")
            if isinstance(size, int):
                return size * factor
    raise ValueError(f"cannot read the resolution of the checkpoint at {p}")


def linked_director(cfg: EvolveConfig, run_dir: Path, ckpt: Path):
    return merge(cfg.director, {
        "data": {"directory": str(run_dir / "director"), "image_size": checkpoint_resolution(ckpt)},
        "models": {"base": f"checkpoint:{ckpt}", "base_steps": cfg.model.steps, "base_guidance": cfg.model.guidance},
    })


def stage_director(cfg: EvolveConfig, ctx: RoundContext, sdir: Path) -> dict:
    """(a) One curation round with the checkpoint as the base; writes ``sdir/sft.parquet``."""
    from raypref.curation_store import version_path, write_sft
    from raypref.generators import PipelineGenerator

    dcfg = linked_director(cfg, ctx.run_dir, ctx.ckpt)
    base = PipelineGenerator(str(ctx.ckpt), num_inference_steps=cfg.model.steps, guidance_scale=cfg.model.guidance)
    teachers, get_judge = director.build_teachers(dcfg), ctx.judge.get
    if ctx.paid is not None:
        paid = ctx.paid.scoped(f"round {ctx.r} director")
        teachers = {name: MeteredGenerator(gen, paid, f"teacher:{name}", dcfg.models.default_teacher_cost)
                    for name, gen in teachers.items()}
        get_judge = lambda: MeteredJudge(ctx.judge.get(), paid, dcfg.judge.call_cost)  # noqa: E731
    result = director.curate(dcfg, ctx.r, base, teachers, get_judge)
    write_sft(sdir / "sft.parquet", result.dataset)
    return {
        "set_version": str(version_path(dcfg.data.directory, ctx.r)), "sft_data": str(sdir / "sft.parquet"),
        "set_size": len(result.dataset), "summary": result.summary, "initial": result.initial,
        "teacher_calls": result.teacher_calls, "teacher_cost": result.teacher_cost,
        "judge_calls": result.judge_calls, "judge_cost": result.judge_cost, "spent": result.spent,
    }


def fit_and_copy(tcfg: train.TrainConfig, out_model: Path) -> dict:
    """Train with ``raypref.train``'s Ray Train trainer; write the final model to ``out_model`` as a full
    pipeline (a LoRA checkpoint is folded into a copy of the starting model)."""
    result = train.build_trainer(tcfg).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {tcfg.run.name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        train_state.write_full_model(d, tcfg, str(out_model))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    history = []
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and "loss" in getattr(df, "columns", []):
        history = [float(x) for x in df["loss"].tolist()]
    return {"model": str(out_model), "metrics": metrics, "loss": metrics.get("loss"), "loss_history": history,
            "steps": tcfg.optim.max_steps, "method": tcfg.loss.method}


def _train_linked(tc: train.TrainConfig, cfg: EvolveConfig, sdir: Path, r: int, stage: str, model: Path, data: str):
    return merge(tc, {"model": {"path": str(model)}, "data": {"path": str(data)},
                      "run": {"name": f"{cfg.run.name}-r{r:03d}-{stage}", "storage_path": str(sdir / "ray"),
                              "export_dir": ""}})


def stage_sft(cfg: EvolveConfig, ctx: RoundContext, sdir: Path) -> dict:
    """(b) Fine-tuning of the round's checkpoint on the curated set."""
    import pyarrow.parquet as pq

    data = ctx.stats["director"]["sft_data"]
    out = fit_and_copy(_train_linked(cfg.sft, cfg, sdir, ctx.r, "sft", ctx.ckpt, data), sdir / "model")
    out["rows"] = pq.read_metadata(data).num_rows
    return out


def stage_prefs(cfg: EvolveConfig, ctx: RoundContext, sdir: Path) -> dict:
    """(c) Preference data of the SFT model: Syn-Pic (ranked) or OSPO (pairs)."""
    import pyarrow.parquet as pq

    r, model = ctx.r, Path(ctx.stats["sft"]["model"])
    spec = f"checkpoint:{model}"
    if cfg.prefs.source == "synpic":
        teachers = [s for s in cfg.synpic.generators.specs if not s.startswith("checkpoint:")]
        scfg = merge(cfg.synpic, {
            "prompts": {"seed": cfg.synpic.prompts.seed + 1000 * cfg.run.seed + r},  # fresh prompts each round
            "generators": {"specs": [*teachers, spec], "image_size": checkpoint_resolution(model),
                           "num_inference_steps": cfg.model.steps, "guidance_scale": cfg.model.guidance,
                           "seed": cfg.synpic.generators.seed + 1000 * cfg.run.seed + r},
            "run": {"output_dir": str(sdir / "synpic")},
        })
        summary = synpic.run(scfg, paid=ctx.paid)
        if not summary["finished"]:
            raise RuntimeError(f"Syn-Pic stopped before the end (run.max_chunks?): {summary['output_dir']}")
        new, tot = summary["this_run"], summary["total"]
        data = str(sdir / "synpic" / "data")
        table = pq.read_table(data, columns=["scores", "reward_names", "generators"])
        teacher = lambda d: {g: v for g, v in d.items() if g.startswith("teacher:")}  # noqa: E731
        return {
            "source": "synpic", "data": data, "rows": tot["rows"], "pairs": tot["pairs"], "images": tot["images"],
            "teacher_calls": teacher(tot["calls"]), "teacher_cost": teacher(tot["cost"]),
            "model_images": sum(tot["calls"][g] for g in tot["calls"] if g.startswith("checkpoint:")),
            "mean_rewards": synpic_mean_rewards(table),
            # what this invocation paid, including chunks a crash made it redo
            "spent": {**NO_SPEND, "teacher_calls": sum(teacher(new["paid"]["calls"]).values()),
                      "teacher_cost": sum(teacher(new["paid"]["cost"]).values())},
        }
    ocfg = merge(cfg.ospo, {
        "generate": {"generator": spec, "num_inference_steps": cfg.model.steps, "guidance_scale": cfg.model.guidance,
                     "seed": cfg.ospo.generate.seed + 1000 * cfg.run.seed + r},
        "run": {"output": str(sdir / "ospo.tmp" / "ospo.parquet"), "round_index": r, "rounds": 1},
    })
    scorer = ospo.VQAScorer(ocfg.judge.backend, ocfg.filter.yes_threshold, **ocfg.judge.kwargs())
    rows, records, summary = ospo.build_round(ocfg, spec, scorer)
    if not rows:
        raise RuntimeError(f"OSPO kept no pair for round {r} (see the filter counts): {summary}")
    shutil.rmtree(sdir / "ospo.tmp", ignore_errors=True)
    summary = ospo.write_outputs(ocfg.run.output, rows, records, summary)
    shutil.rmtree(sdir / "ospo", ignore_errors=True)
    os.replace(sdir / "ospo.tmp", sdir / "ospo")
    summary = {k: v.replace(str(sdir / "ospo.tmp"), str(sdir / "ospo")) if isinstance(v, str) else v
               for k, v in summary.items()}
    return {"source": "ospo", "data": str(sdir / "ospo" / "ospo.parquet"), "rows": len(rows),
            "pairs": len(rows), "teacher_calls": {}, "teacher_cost": {}, "summary": summary}


def synpic_mean_rewards(table) -> dict:
    """Mean reward of each reward model over all images of a Syn-Pic table, per generator kind."""
    sums: dict = {}
    for names, scores, gens in zip(*(table.column(c).to_pylist() for c in ("reward_names", "scores", "generators"))):
        for name, per_image in zip(names or [], scores or []):
            for g, s in zip(gens, per_image or []):
                kind = "model" if g.startswith("checkpoint:") else "teachers"
                acc = sums.setdefault(f"{name}/{kind}", [0.0, 0])
                acc[0] += float(s)
                acc[1] += 1
    return {k: v[0] / v[1] for k, v in sorted(sums.items()) if v[1]}


def stage_train(cfg: EvolveConfig, ctx: RoundContext, sdir: Path) -> dict:
    """(d) Preference training of the SFT model -> the round's checkpoint."""
    sft_model = Path(ctx.stats["sft"]["model"])
    tcfg = _train_linked(cfg.train, cfg, sdir, ctx.r, "train", sft_model, ctx.stats["prefs"]["data"])
    return fit_and_copy(tcfg, sdir / "model")


def stage_eval(cfg: EvolveConfig, ctx: RoundContext, sdir: Path) -> dict:
    """(e) ShapesEval of the round's model (written to ``sdir``: images/, manifest.jsonl, scores.json),
    mean analytic rewards of its images, and the report's fixed samples (``sdir/samples/``)."""
    from raypref.generators import PipelineGenerator
    from raypref.prefdata import decode_png, encode_png
    from raypref.shapes.evaluate import run_eval
    from raypref.shapes.score import aesthetic, faithfulness

    ckpt = Path(ctx.stats["train"]["model"]) if "train" in ctx.stats else ctx.ckpt
    gen = PipelineGenerator(str(ckpt), num_inference_steps=cfg.model.steps, guidance_scale=cfg.model.guidance)
    e = cfg.eval
    scores = run_eval(gen, e.n_per_category, e.seed, sdir, batch_size=e.batch_size)
    rows = [json.loads(ln) for ln in (sdir / "manifest.jsonl").read_text().splitlines() if ln.strip()]
    faith, aes = [], []
    for row in rows:
        im = decode_png((sdir / row["image"]).read_bytes())
        faith.append(float(faithfulness(row["prompt"], im)))
        aes.append(float(aesthetic(im)))
    prompts = list(e.report_prompts)
    images = gen.generate(prompts, [e.report_seed + i for i in range(len(prompts))])
    (sdir / "samples").mkdir(exist_ok=True)
    samples = []
    for i, (p, im) in enumerate(zip(prompts, images)):
        name = f"samples/{i:02d}.png"
        (sdir / name).write_bytes(encode_png(im))
        samples.append({"prompt": p, "seed": e.report_seed + i, "image": name})
    atomic_write_json(sdir / "samples.json", samples)
    return {"overall": scores["overall"], "categories": scores["categories"], "n": scores["n"], "seed": e.seed,
            "shapes": scores["shapes"], "model": str(ckpt),
            "mean_rewards": {"faithfulness": sum(faith) / len(faith), "aesthetic": sum(aes) / len(aes)},
            "dir": str(sdir)}
