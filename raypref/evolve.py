"""Self-evolving alignment rounds: curate -> SFT -> preference data -> preference training -> ShapesEval.

One round r (``round-NNN/`` under ``run.output_dir``), starting from the checkpoint C of round r - 1,
runs the stages of ``raypref.stages`` in order: (a) director curation with C as the base model and
the judge on Ray Serve, (b) SFT on the curated set, (c) preference data of the SFT model (Syn-Pic or
OSPO), (d) preference training -> the round's checkpoint, (e) ShapesEval. Round 0 is (e) alone on
the starting checkpoint, so the report shows the base model's score. The stages are passed in
(:class:`Stages`), so the round loop (resume, skipped stages, the spend ledger) is tested with fake
stages in seconds.

Design choices (why):

- Resume. A round is finished when ``round-NNN/manifest.json`` exists (written by tmp + os.replace,
  last). Inside a round each stage writes ``round-NNN/<stage>/stage.json`` last, so a re-run
  skips finished stages; Ray Train resumes a half-done training from its checkpoints (same
  run.name and storage_path) and Syn-Pic skips its committed chunks. A stage's figures (calls,
  costs, losses, wall time) live in its stage.json, so the manifest of a resumed round is complete.
- LoRA (``model.lora``, the CPU default) or full fine-tuning per stage. A LoRA result is folded into
  a copy of the stage's starting model (``train.merge_lora_checkpoint``), so every stage hands the
  next a plain diffusers pipeline and the next round's DPO reference is the previous round's model.
- The trained model is taken from Ray Train's checkpoint (``result.checkpoint``, on
  ``run.storage_path``), not from an ``export_dir`` written by rank 0, so it works on a multi-node
  cluster as long as ``run.output_dir`` is shared storage.
- Every stage reads the sizes of its own nested config (``director``, ``sft``, ``synpic``/``ospo``,
  ``train``, ``eval``); the driver sets only what links the stages (paths, the current checkpoint,
  image size, sampler steps, per-round seeds). Those fields are ``evolve_config.LINKED``; setting
  one is an error.
- Each invocation appends its own spending (teacher and judge calls actually made by this process)
  to ``invocations.jsonl``, so a resumed run can be checked to pay only for unfinished work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from raypref import stages
from raypref.config import to_dict
from raypref.evolve_config import PRESETS, EvolveConfig
from raypref.files import atomic_write_json, read_json
from raypref.served_judge import ServedJudge
from raypref.spend import InvocationLedger

STAGES = ("director", "sft", "prefs", "train", "eval")
STAGE_FILE = "stage.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Stages:
    """The round's stages, each ``stage(cfg, ctx: stages.RoundContext, stage_dir) -> stats``."""

    director: Callable = stages.stage_director
    sft: Callable = stages.stage_sft
    prefs: Callable = stages.stage_prefs
    train: Callable = stages.stage_train
    eval: Callable = stages.stage_eval


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / f"round-{r:03d}"


def finished_rounds(run_dir: Path) -> list[int]:
    """Rounds whose manifest exists, in order."""
    out = []
    for p in sorted(Path(run_dir).glob("round-*/" + MANIFEST)):
        try:
            out.append(int(p.parent.name.split("-")[1]))
        except ValueError:
            continue
    return out


def run_stage(rdir: Path, name: str, fn) -> tuple[dict, bool]:
    """(stats, ran): ``fn(stage_dir) -> stats`` unless ``stage_dir/stage.json`` exists (then its stats).
    stage.json is written last and atomically: it marks the stage as finished."""
    sdir = rdir / name
    marker = sdir / STAGE_FILE
    if marker.exists():
        return read_json(marker), False
    sdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    stats = fn(sdir)
    stats["wall_seconds"] = time.time() - t0
    atomic_write_json(marker, stats)
    return stats, True


def _log(cfg: EvolveConfig, msg: str) -> None:
    if cfg.run.progress:
        print(f"[evolve] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run_round(cfg: EvolveConfig, run_dir: Path, r: int, ckpt: Path, judge, spend: InvocationLedger,
              round_stages: Stages = Stages()) -> dict:
    """Run (or finish) round ``r`` from checkpoint ``ckpt``; returns its manifest (also written). A
    stage with a stage.json is not run again; a stage that runs adds what it paid to ``spend``."""
    rdir = round_dir(run_dir, r)
    rdir.mkdir(parents=True, exist_ok=True)
    ctx = stages.RoundContext(run_dir=run_dir, r=r, ckpt=ckpt, judge=judge, paid=spend.paid)
    for name in (STAGES if r > 0 else ("eval",)):
        _log(cfg, f"round {r}: {name}")
        fn = getattr(round_stages, name)
        ctx.stats[name], ran = run_stage(rdir, name, lambda sdir, fn=fn: fn(cfg, ctx, sdir))
        if ran:
            spend.add(r, name, **ctx.stats[name].get("spent", {}))
    new_ckpt = Path(ctx.stats["train"]["model"]) if r > 0 else ckpt
    manifest = build_manifest(cfg, r, ckpt, new_ckpt, ctx.stats)
    atomic_write_json(rdir / MANIFEST, manifest)
    return manifest


def build_manifest(cfg: EvolveConfig, r: int, parent: Path, ckpt: Path, stats: dict) -> dict:
    d, sft, prefs, train, ev = (stats.get(k, {}) for k in STAGES)
    teacher_calls = {f"director/{k}": v for k, v in d.get("teacher_calls", {}).items()}
    teacher_calls.update({f"prefs/{k}": v for k, v in prefs.get("teacher_calls", {}).items()})
    teacher_cost = {f"director/{k}": v for k, v in d.get("teacher_cost", {}).items()}
    teacher_cost.update({f"prefs/{k}": v for k, v in prefs.get("teacher_cost", {}).items()})
    judge_cost = float(d.get("judge_cost", 0.0))
    return {
        "round": r,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint": str(ckpt),
        "parent_checkpoint": None if r == 0 else str(parent),
        "datasets": {
            "director_set": d.get("set_version"), "sft": d.get("sft_data"), "prefs": prefs.get("data"),
            "prefs_source": prefs.get("source"), "eval": ev.get("dir"),
        },
        "counts": {
            "director_set": d.get("set_size", 0), "director_sampled": d.get("summary", {}).get("sampled", 0),
            "director_decisions": d.get("summary", {}).get("decisions", {}),
            "sft_rows": sft.get("rows", 0), "pref_rows": prefs.get("rows", 0), "pref_pairs": prefs.get("pairs", 0),
            "eval_images": ev.get("n", 0),
        },
        "teacher_calls": teacher_calls,
        "teacher_cost": teacher_cost,
        "teacher_calls_total": int(sum(teacher_calls.values())),
        "judge_calls": int(d.get("judge_calls", 0)),
        "judge_cost": judge_cost,
        "cost_total": float(sum(teacher_cost.values())) + judge_cost,
        "scores": {"overall": ev.get("overall"), "categories": ev.get("categories", {}),
                   "shapes": ev.get("shapes", {})},
        "mean_rewards": {"eval": ev.get("mean_rewards", {}), "prefs": prefs.get("mean_rewards", {})},
        "losses": {"sft": sft.get("loss"), "pref": train.get("loss"),
                   "sft_history": sft.get("loss_history", []), "pref_history": train.get("loss_history", []),
                   "pref_metrics": train.get("metrics", {})},
        "stage_seconds": {k: stats[k]["wall_seconds"] for k in STAGES if k in stats},
        "methods": {"sft": cfg.sft.loss.method, "pref": cfg.train.loss.method, "prefs_source": cfg.prefs.source},
    }


def run(cfg: EvolveConfig, round_stages: Stages = Stages()) -> list[dict]:
    """All rounds of ``cfg``, resuming after the last finished one. Ray must be initialised.
    Returns the manifests of rounds 0..run.rounds."""
    from raypref.checkpoints import resolve_checkpoint

    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = run_dir / "config.json"
    if not cfg_file.exists():
        atomic_write_json(cfg_file, to_dict(cfg))
    done = finished_rounds(run_dir)
    manifests = {r: read_json(round_dir(run_dir, r) / MANIFEST) for r in done}
    ckpt = resolve_checkpoint(cfg.model.base)
    if done and 0 in manifests and Path(manifests[0]["checkpoint"]) != ckpt:
        raise ValueError(f"{run_dir} was started from {manifests[0]['checkpoint']}, not {ckpt}; "
                         "use a new run.output_dir")
    spend = InvocationLedger(run_dir)
    judge = ServedJudge(cfg)
    todo = [r for r in range(cfg.run.rounds + 1) if r not in manifests]
    _log(cfg, f"{run_dir}: rounds finished {done or 'none'}, to run {todo or 'none'}")
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.run.rounds + 1, initial=cfg.run.rounds + 1 - len(todo), desc="evolve rounds",
                   disable=not cfg.run.progress, file=sys.stderr)
        for r in range(cfg.run.rounds + 1):
            if r in manifests:
                ckpt = Path(manifests[r]["checkpoint"])
                continue
            if r > 0 and (r - 1) not in manifests:
                raise RuntimeError(f"round {r - 1} has no manifest")
            manifests[r] = run_round(cfg, run_dir, r, ckpt, judge, spend, round_stages)
            ckpt = Path(manifests[r]["checkpoint"])
            if cfg.run.report:
                from raypref.report import write_report

                write_report(run_dir)
            m = manifests[r]
            _log(cfg, f"round {r} done: ShapesEval {m['scores']['overall']:.3f}, "
                      f"stages {json.dumps({k: round(v, 1) for k, v in m['stage_seconds'].items()})}")
            bar.update(1)
        bar.close()
    finally:
        judge.close()
    if cfg.run.report and not todo:
        from raypref.report import write_report

        write_report(run_dir)
    return [manifests[r] for r in sorted(manifests) if r <= cfg.run.rounds]


# ------------------------------------------------------------------------------------------ job entry
def parse_config(argv: list[str] | None = None) -> EvolveConfig:
    from raypref.config import load_config

    args = build_parser().parse_args(argv)
    return load_config(PRESETS[args.preset](), args.config, args.overrides)


def build_parser(parser=None):
    import argparse

    from raypref.config import describe
    from raypref.evolve_config import LINKED, shapes_cpu

    keys = [line + ("  [set by the driver]" if line.split(" = ")[0].strip() in LINKED else "")
            for line in describe(shapes_cpu())]
    parser = parser or argparse.ArgumentParser(
        prog="evolve_and_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (values of --preset shapes_cpu):\n" + "\n".join(keys))
    parser.add_argument("--preset", default="shapes_cpu", choices=sorted(PRESETS),
                        help="starting config: shapes_cpu (default; 2-core CPU, shipped base model), "
                             "sdxl_8xh100 / sd3_8xh100 (documented GPU examples)")
    parser.add_argument("--config", help="YAML file applied over the preset (same nesting as the config)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's, Ray Data's and the model libraries' own output (default: in ray-logs/)")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value applied last, e.g. run.rounds=2 run.output_dir=/tmp/ev "
                             "model.base=/path/to/pipeline prefs.source=ospo train.loss.method=rankdpo "
                             "sft.optim.max_steps=100 eval.n_per_category=30")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the config, connect to Ray (RAY_ADDRESS) or start a local one (run.num_cpus), run."""
    import ray

    from raypref.console import link_ray_logs, quiet_libraries

    args = build_parser().parse_args(argv)
    cfg = parse_config(argv)
    verbose = args.verbose
    if not verbose:
        quiet_libraries()
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:  # a running cluster (ray job submit sets this): its resources, never ours
            ray.init(address=address, **quiet)
        else:  # a fresh local Ray, never an unrelated running one
            ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False, **quiet)
        started = True
    run_dir = Path(cfg.run.output_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = link_ray_logs(run_dir)
    if logs and not verbose:
        _log(cfg, f"Ray's logs (workers, Serve, Train): {logs}")
    try:
        manifests = run(cfg)
    finally:
        if started:
            ray.shutdown()
    for m in manifests:
        print(f"round {m['round']}: ShapesEval {m['scores']['overall']:.3f}  checkpoint {m['checkpoint']}")
    return manifests
