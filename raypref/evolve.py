"""Self-evolving alignment rounds: curate -> SFT -> preference data -> preference training -> ShapesEval.

One round r (``round-NNN/`` under ``run.output_dir``), starting from the checkpoint C of round r - 1:

    (a) director   EvolveDirector curation (raypref.director) of a dynamic (prompt, teacher image)
                   set, C as the base model, the judge served by Ray Serve (serve/judge.py) and used
                   through a DeploymentHandle; the set is written as SFT data.
    (b) sft        fine-tuning (LoRA or full) of C on the curated set (jobs/train_preference.py's trainer).
    (c) prefs      preference data of the SFT model: Syn-Pic ranking (raypref.synpic; BalancedDPO reads
                   its consensus pairs) or OSPO pairs (raypref.ospo via jobs/build_ospo.py).
    (d) train      dpo | rankdpo | balanced from the SFT model -> the round's checkpoint.
    (e) eval       ShapesEval of the new checkpoint, written so anyone can re-score it, plus the
                   report's fixed sample grid.

Round 0 is (e) alone on the starting checkpoint, so the report shows the base model's score.

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
  image size, sampler steps, per-round seeds). Those fields are listed in ``LINKED``.
- Each invocation appends its own spending (teacher and judge calls actually made by this process)
  to ``invocations.jsonl``, so a resumed run can be checked to pay only for unfinished work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from raypref import director as D
from raypref import ospo as O
from raypref import synpic as S
from raypref import train as T
from raypref.config import check, merge, to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent
PREF_METHODS = ("dpo", "rankdpo", "balanced")
PREF_SOURCES = ("synpic", "ospo")
STAGES = ("director", "sft", "prefs", "train", "eval")
STAGE_FILE = "stage.json"
MANIFEST = "manifest.json"
# Fields of the nested stage configs that the driver sets every round (their config values are ignored).
LINKED = (
    "director.data.directory", "director.data.image_size", "director.models.base", "director.models.base_steps",
    "director.models.base_guidance", "sft.model.path", "sft.data.path", "sft.run.name", "sft.run.storage_path",
    "sft.run.export_dir", "synpic.generators.specs (the checkpoint is appended to the teacher specs)",
    "synpic.generators.image_size", "synpic.generators.num_inference_steps", "synpic.generators.guidance_scale",
    "synpic.run.output_dir", "ospo.generate.generator", "ospo.run.output", "ospo.run.round_index",
    "train.model.path", "train.data.path", "train.run.name", "train.run.storage_path", "train.run.export_dir",
)
REPORT_PROMPTS = (  # one per ShapesEval category
    "a circle", "a square and a triangle", "three circles", "a blue square", "a triangle left of a square",
    "a red circle and a cyan triangle",
)


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class RunSection:
    name: str = "evolve-shapes"
    output_dir: str = "~/raypref_runs/evolve-shapes"
    rounds: int = 3  # rounds after round 0 (the evaluation of the starting checkpoint)
    seed: int = 0  # mixed into the per-round seeds of Syn-Pic / OSPO
    num_cpus: float = 4.0  # logical CPUs of a LOCAL Ray (ignored with RAY_ADDRESS); > cores is fine
    report: bool = True  # write report.md after every round
    progress: bool = True

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")
        check(bool(self.output_dir), "run.output_dir must not be empty")
        check(0 <= self.rounds <= 999, f"run.rounds must be in [0, 999], got {self.rounds}")
        check(self.num_cpus > 0, f"run.num_cpus must be > 0, got {self.num_cpus}")


@dataclass(frozen=True)
class ModelSection:
    base: str = "shipped"  # starting checkpoint: 'shipped', a diffusers pipeline dir or a Ray Train checkpoint
    steps: int = 30  # sampling steps of every checkpoint (director base, Syn-Pic/OSPO, eval, report)
    guidance: float = 3.0

    def __post_init__(self):
        check(bool(self.base), "model.base must not be empty")
        check(self.steps >= 1, f"model.steps must be >= 1, got {self.steps}")
        check(self.guidance >= 0, f"model.guidance must be >= 0, got {self.guidance}")


@dataclass(frozen=True)
class JudgeServeSection:
    """The director's judge as a Serve app (backend and its options: ``director.judge``)."""

    app_name: str = "evolve-judge"
    num_cpus: float = 0.25  # per replica; fractional so it never starves training on 2 cores
    num_gpus: float = 0.0
    replicas: int = 1
    max_batch_size: int = 16
    proxy_location: str = "Disabled"  # the driver only uses a handle; "HeadOnly" also serves HTTP

    def __post_init__(self):
        check(bool(self.app_name), "judge_serve.app_name must not be empty")
        check(self.num_cpus > 0 and self.num_gpus >= 0, "judge_serve.num_cpus must be > 0, num_gpus >= 0")
        check(self.replicas >= 1, f"judge_serve.replicas must be >= 1, got {self.replicas}")
        check(self.max_batch_size >= 1, f"judge_serve.max_batch_size must be >= 1, got {self.max_batch_size}")
        check(self.proxy_location in ("Disabled", "HeadOnly", "EveryNode"),
              f"judge_serve.proxy_location must be Disabled|HeadOnly|EveryNode, got {self.proxy_location!r}")


@dataclass(frozen=True)
class PrefsSection:
    source: str = "synpic"  # synpic (ranked K images; balanced uses its consensus pairs) | ospo (pairs)

    def __post_init__(self):
        check(self.source in PREF_SOURCES, f"prefs.source must be one of {PREF_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class EvalSection:
    n_per_category: int = 20  # ShapesEval prompts per category
    seed: int = 0  # fixed: every round is scored on the same prompts and seeds
    batch_size: int = 64
    report_prompts: tuple[str, ...] = REPORT_PROMPTS  # the report's before/after grid (same every round)
    report_seed: int = 1234

    def __post_init__(self):
        check(self.n_per_category >= 1, f"eval.n_per_category must be >= 1, got {self.n_per_category}")
        check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        check(len(self.report_prompts) >= 1, "eval.report_prompts must hold at least one prompt")


@dataclass(frozen=True)
class EvolveConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    director: D.DirectorConfig = field(default_factory=D.DirectorConfig)
    judge_serve: JudgeServeSection = field(default_factory=JudgeServeSection)
    sft: T.TrainConfig = field(default_factory=lambda: _train_cfg("sft", 60, 1e-3))
    prefs: PrefsSection = field(default_factory=PrefsSection)
    synpic: S.SynPicConfig = field(default_factory=S.SynPicConfig)
    ospo: O.OSPOConfig = field(default_factory=O.OSPOConfig)
    train: T.TrainConfig = field(default_factory=lambda: _train_cfg("dpo", 40, 1e-4, sft_weight=500.0))
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        check(self.sft.loss.method == "sft", f"sft.loss.method must be 'sft', got {self.sft.loss.method!r}")
        check(self.train.loss.method in PREF_METHODS,
              f"train.loss.method must be one of {PREF_METHODS}, got {self.train.loss.method!r}")


# LoRA on every linear layer of the shapes transformer's blocks plus its output projection (the
# layer that draws each patch's pixels): attention alone cannot move outlines within a few dozen steps.
SHAPES_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_out")


def _train_cfg(method: str, steps: int, lr: float, batch: int = 16, cpus: float = 1.0, lora: bool = True,
               rank: int = 16, sft_weight: float = 0.0) -> T.TrainConfig:
    return T.TrainConfig(
        model=T.ModelSection(lora=lora, lora_rank=rank, lora_alpha=float(rank), lora_targets=SHAPES_LORA_TARGETS),
        loss=T.LossSection(method=method, sft_weight=sft_weight),
        optim=T.OptimSection(lr=lr, warmup_steps=min(10, steps // 5), batch_size=batch, max_steps=steps),
        # max_failures: a worker lost to an overloaded node restarts from the last checkpoint
        run=T.RunSection(num_workers=1, cpus_per_worker=cpus, checkpoint_every=steps, log_every=10,
                         keep_checkpoints=1, max_failures=2),
    )


def shapes_cpu() -> EvolveConfig:
    """The default: the shipped shapes base model on a 2-core CPU, 3 rounds in under 15 minutes.

    Director = 4 prompts per category judged against 4 teachers; SFT = LoRA (rank 16) on the curated
    set; Syn-Pic = 4 prompts per category x (2 teachers + the model); DPO = LoRA with the winner's
    error added (``loss.sft_weight``) so a small preference set is not fitted by degrading every image;
    ShapesEval = 50 prompts per category (the same prompts and seeds every round; one standard
    error about 0.025 overall, where 20 per category gave 0.035 and hid changes of a round).
    """
    return EvolveConfig(
        run=RunSection(rounds=3),
        model=ModelSection(steps=20, guidance=3.0),
        director=D.DirectorConfig(
            data=D.DataSection(n_per_category=4, init_teacher="tournament"),
            round=D.RoundSection(rounds=999, sample_fraction=0.5, n_expand=2, p_mutate=0.2, batch_size=64),
            models=D.ModelsSection(teachers=("prism", "quill", "vellum", "zephyr")),
            judge=D.JudgeSection(error_rate=0.1),
            run=D.RunSection(name="evolve-director"),
        ),
        sft=_train_cfg("sft", 60, 1e-3),
        synpic=dataclasses.replace(
            S.shapes_cpu(),
            prompts=S.PromptsSection(n_per_category=4),
            generators=S.GeneratorsSection(specs=("teacher:prism", "teacher:quill"), batch_size=32),
            run=S.RunSection(chunk_size=64, window_chunks=0, progress=False),
        ),
        train=_train_cfg("dpo", 40, 1e-4, sft_weight=500.0),
        eval=EvalSection(n_per_category=50, seed=0),
    )


def tiny_test() -> EvolveConfig:
    """Seconds-long rounds for tests: a 16 x 16 tiny pipeline (``model.base`` set by the test), two
    teachers, one prompt per category, two optimizer steps per training."""
    return EvolveConfig(
        run=RunSection(name="evolve-tiny", output_dir="/tmp/raypref_evolve_tiny", rounds=2, num_cpus=4.0),
        model=ModelSection(base="/tmp/raypref_evolve_tiny_base", steps=2, guidance=3.0),
        director=D.DirectorConfig(
            data=D.DataSection(n_per_category=1, init_teacher="mix", image_size=16),
            round=D.RoundSection(rounds=999, sample_fraction=1.0, n_expand=1, p_mutate=0.5, batch_size=16),
            models=D.ModelsSection(teachers=("clean", "vellum")),
            judge=D.JudgeSection(error_rate=0.0),
            run=D.RunSection(name="evolve-director-tiny"),
        ),
        judge_serve=JudgeServeSection(max_batch_size=8),
        sft=_train_cfg("sft", 2, 1e-3, batch=4, cpus=0.5),
        synpic=dataclasses.replace(
            S.tiny_test(),
            prompts=S.PromptsSection(n_per_category=1),
            generators=S.GeneratorsSection(specs=("teacher:prism", "teacher:quill"), image_size=16, batch_size=8),
            run=S.RunSection(chunk_size=8, window_chunks=0, progress=False),
        ),
        ospo=O.tiny_test(),
        train=_train_cfg("dpo", 2, 1e-3, batch=4, cpus=0.5),
        eval=EvalSection(n_per_category=2, seed=0, batch_size=16, report_prompts=REPORT_PROMPTS[:3]),
    )


def sdxl_8xh100() -> EvolveConfig:
    """Example (not run here): SDXL on 8 x H100 with a VLM judge behind an OpenAI-compatible endpoint.

    Teachers are checkpoint generators (local diffusers snapshots), the judge a served VLM (vLLM or
    Ray Serve LLM at ``base_url``), Syn-Pic ranks 4 teachers + the model with learned rewards, and both
    trainings use the SDXL Diffusion-DPO recipe of ``raypref.train.sdxl_8xh100`` (full fine-tuning,
    8 workers, bf16). ``run.output_dir`` and the trainings' storage must be shared storage.
    """
    big = T.sdxl_8xh100()
    return EvolveConfig(
        run=RunSection(name="evolve-sdxl", output_dir="/mnt/shared/evolve-sdxl", rounds=5),
        model=ModelSection(base="/models/stable-diffusion-xl-base-1.0", steps=30, guidance=5.0),
        director=D.DirectorConfig(
            data=D.DataSection(n_per_category=500,
                               init_teacher="tournament", image_size=1024),
            round=D.RoundSection(rounds=999, sample_fraction=0.25, n_expand=4, p_mutate=0.2, batch_size=16),
            models=D.ModelsSection(teachers=("checkpoint:/models/flux.1-dev", "checkpoint:/models/sd3.5-large")),
            judge=D.JudgeSection(backend="openai", model="Qwen/Qwen2.5-VL-72B-Instruct",
                                 base_url="http://vlm-judge:8000/v1", call_cost=0.002),
        ),
        judge_serve=JudgeServeSection(num_cpus=1.0, replicas=4, max_batch_size=32, proxy_location="HeadOnly"),
        sft=merge(big, {"loss": {"method": "sft"}, "optim": {"max_steps": 1000}, "run": {"name": "sft-sdxl"}}),
        synpic=dataclasses.replace(
            S.shapes_cpu(),
            prompts=S.PromptsSection(source="/mnt/shared/prompts.txt", grammar="none"),
            generators=S.GeneratorsSection(specs=("checkpoint:/models/flux.1-dev", "checkpoint:/models/sd3.5-large"),
                                           image_size=1024, num_gpus=1.0, num_cpus=4.0, pool_size=2),
            rewards=S.RewardsSection(specs=("pickscore:/models/pickscore", "hpsv2:/models/hpsv2",
                                            "imagereward:/models/imagereward"), num_gpus=0.5, num_cpus=2.0),
            run=S.RunSection(chunk_size=1024, progress=True),
        ),
        train=merge(big, {"loss": {"method": "rankdpo"}}),
        eval=EvalSection(n_per_category=50),
    )


def sd3_8xh100() -> EvolveConfig:
    """Example (not run here): as :func:`sdxl_8xh100` with SD3-medium (flow matching) as the model."""
    cfg = sdxl_8xh100()
    path = "/models/stable-diffusion-3-medium-diffusers"
    return merge(cfg, {"run": {"name": "evolve-sd3", "output_dir": "/mnt/shared/evolve-sd3"},
                       "model": {"base": path, "guidance": 7.0},
                       "sft": {"model": {"path": path}}, "train": {"model": {"path": path}}})


PRESETS = {"shapes_cpu": shapes_cpu, "tiny_test": tiny_test, "sdxl_8xh100": sdxl_8xh100, "sd3_8xh100": sd3_8xh100}


# ------------------------------------------------------------------------------------------ helpers
def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / f"round-{r:03d}"


def atomic_write_json(path: Path, obj) -> None:
    """tmp + os.replace: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def finished_rounds(run_dir: Path) -> list[int]:
    """Rounds whose manifest exists, in order."""
    out = []
    for p in sorted(Path(run_dir).glob("round-*/" + MANIFEST)):
        try:
            out.append(int(p.parent.name.split("-")[1]))
        except ValueError:
            continue
    return out


def load_job(name: str):
    """A job module of the repo's ``jobs/`` directory (not part of the installed package)."""
    path = REPO_ROOT / "jobs" / f"{name}.py"
    if not path.exists():
        raise ValueError(f"job {name!r} not found at {path} (run from a raypref checkout)")
    key = f"raypref_jobs_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def checkpoint_resolution(path) -> int:
    """Sample size of a saved pipeline's denoiser (pixel space for shapes models)."""
    from raypref.generators import resolve_checkpoint

    p = resolve_checkpoint(path)
    for sub in ("transformer", "unet"):
        f = p / sub / "config.json"
        if f.exists():
            size = json.loads(f.read_text()).get("sample_size")
            if isinstance(size, int):
                return size * (8 if sub == "unet" else 1)  # latent UNets: VAE factor 8
    raise ValueError(f"cannot read the resolution of the checkpoint at {p}")


def _log(cfg: EvolveConfig, msg: str) -> None:
    if cfg.run.progress:
        print(f"[evolve] {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


class _Spend:
    """This invocation's own teacher/judge calls (not those of stages it skipped)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "invocations.jsonl"
        self.record = {"pid": os.getpid(), "started": time.time(), "rounds": [], "stages": [],
                       "teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}
        self._write()  # an invocation that runs nothing is recorded too

    def add(self, r: int, stage: str, teacher_calls: int = 0, teacher_cost: float = 0.0, judge_calls: int = 0):
        if r not in self.record["rounds"]:
            self.record["rounds"].append(r)
        self.record["stages"].append(f"{r}:{stage}")
        self.record["teacher_calls"] += int(teacher_calls)
        self.record["teacher_cost"] += float(teacher_cost)
        self.record["judge_calls"] += int(judge_calls)
        self._write()

    def _write(self):
        # one line per invocation, rewritten in place (atomically) as the invocation progresses
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        mine = json.dumps(self.record)
        key = f'"pid": {self.record["pid"]}, "started": {json.dumps(self.record["started"])}'
        lines = [ln for ln in lines if key not in ln] + [mine]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)


def read_invocations(run_dir) -> list[dict]:
    p = Path(run_dir) / "invocations.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.exists() else []


# ------------------------------------------------------------------------------------------ the served judge
class ServedJudge:
    """Starts the judge app (serve/judge.py) once, on first use; ``close()`` deletes only this app."""

    def __init__(self, cfg: EvolveConfig):
        self.cfg, self.judge = cfg, None

    def get(self) -> D.HandleJudge:
        if self.judge is None:
            from ray import serve

            if str(REPO_ROOT) not in sys.path:
                sys.path.insert(0, str(REPO_ROOT))
            from serve.judge import build_judge_app

            s, j = self.cfg.judge_serve, self.cfg.director.judge
            serve.start(proxy_location=s.proxy_location)  # no-op when Serve already runs
            app = build_judge_app(j.backend, judge_kwargs(j), num_cpus=s.num_cpus, num_gpus=s.num_gpus,
                                  autoscaling_config={"min_replicas": s.replicas, "max_replicas": s.replicas},
                                  max_batch_size=s.max_batch_size)
            handle = serve.run(app, name=s.app_name, route_prefix=None)
            self.judge = D.HandleJudge(handle)
        return self.judge

    def close(self) -> None:
        if self.judge is not None:
            from ray import serve

            try:
                serve.delete(self.cfg.judge_serve.app_name)
            except Exception as e:  # noqa: BLE001 - cleanup must not hide the run's own error
                print(f"[evolve] could not delete the judge app: {e}", file=sys.stderr)
            self.judge = None


def judge_kwargs(j: D.JudgeSection) -> dict:
    """director.judge -> the backend's keyword arguments (as raypref.director.build_judge)."""
    if j.backend == "shapes":
        return {"error_rate": j.error_rate, "seed": j.seed}
    if j.backend == "openai":
        return {"model": j.model, "base_url": j.base_url or None, "seed": j.seed, "shapes_grammar": True}
    return {"model_path": j.model, "seed": j.seed, "shapes_grammar": True}


# ------------------------------------------------------------------------------------------ stages
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


def _teacher_counters(teachers: dict) -> tuple[dict, dict]:
    calls, cost = {}, {}
    for name, gen in teachers.items():
        c = D._counters(gen)
        calls[name], cost[name] = (c if c is not None else (0, 0.0))
    return calls, cost


def stage_director(cfg: EvolveConfig, run_dir: Path, r: int, ckpt: Path, judge: ServedJudge, sdir: Path) -> dict:
    """(a) One curation round with ``ckpt`` as the base; writes ``sdir/sft.parquet``."""
    from raypref.generators import PipelineGenerator

    dcfg = linked_director(cfg, run_dir, ckpt)
    directory = dcfg.data.directory
    teachers = D.build_teachers(dcfg)
    initial = {"teacher_calls": {}, "teacher_cost": {}, "judge_calls": 0}
    spent = {"teacher_calls": 0, "teacher_cost": 0.0, "judge_calls": 0}  # by this invocation
    versions = D.versions(directory)
    if r == 1 and 0 not in versions:  # the initial set, paid once, part of round 1's bill
        hj = judge.get()
        j0 = hj.calls
        ds0 = D.build_initial_set(dcfg, teachers, hj)
        calls, cost = _teacher_counters(teachers)
        initial = {"teacher_calls": calls, "teacher_cost": cost, "judge_calls": hj.calls - j0,
                   "judge_cost": (hj.calls - j0) * dcfg.judge.call_cost, "size": len(ds0)}
        atomic_write_json(Path(directory).expanduser() / "initial.json", initial)
        D.save(directory, ds0)
        spent = {"teacher_calls": sum(calls.values()), "teacher_cost": sum(cost.values()),
                 "judge_calls": initial["judge_calls"]}
    elif r == 1:
        initial = read_json(Path(directory).expanduser() / "initial.json")
    if r in D.versions(directory):  # committed by an interrupted run: no new calls
        dataset = D.load(directory, r)
    else:
        previous = D.load(directory, max(v for v in D.versions(directory) if v < r))
        base = PipelineGenerator(str(ckpt), num_inference_steps=cfg.model.steps, guidance_scale=cfg.model.guidance)
        dataset, log = D.run_round(previous, base, teachers, judge.get(), dcfg, r)
        D.write_round(directory, dataset, log)
        sm = log["summary"]
        spent = {"teacher_calls": spent["teacher_calls"] + sum(sm["teacher_calls"].values()),
                 "teacher_cost": spent["teacher_cost"] + sum(sm["teacher_cost"].values()),
                 "judge_calls": spent["judge_calls"] + sm["judge_calls"]}
    summary = read_json(Path(directory).expanduser() / "logs" / f"round-{r:04d}.summary.json")
    D.write_sft(sdir / "sft.parquet", dataset)
    tc = _sum_dicts(summary["teacher_calls"], initial.get("teacher_calls", {}))
    tcost = _sum_dicts(summary["teacher_cost"], initial.get("teacher_cost", {}))
    return {
        "set_version": str(D.version_path(directory, r)), "sft_data": str(sdir / "sft.parquet"),
        "set_size": len(dataset), "summary": summary, "initial": initial,
        "teacher_calls": tc, "teacher_cost": tcost,
        "judge_calls": int(summary["judge_calls"]) + int(initial.get("judge_calls", 0)),
        "judge_cost": float(summary["judge_cost"]) + float(initial.get("judge_cost", 0.0)),
        "spent_by_this_invocation": spent,
    }


def _sum_dicts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))}


def linked_director(cfg: EvolveConfig, run_dir: Path, ckpt: Path) -> D.DirectorConfig:
    return merge(cfg.director, {
        "data": {"directory": str(run_dir / "director"), "image_size": checkpoint_resolution(ckpt)},
        "models": {"base": f"checkpoint:{ckpt}", "base_steps": cfg.model.steps, "base_guidance": cfg.model.guidance},
    })


def fit_and_copy(tcfg: T.TrainConfig, out_model: Path) -> dict:
    """Train with jobs/train_preference.py's trainer; write the final model to ``out_model`` as a full
    pipeline (a LoRA checkpoint is folded into a copy of the starting model)."""
    job = load_job("train_preference")
    result = job.build_trainer(tcfg).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {tcfg.run.name} produced no checkpoint")
    with result.checkpoint.as_directory() as d:
        T.write_full_model(d, tcfg, str(out_model))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    history = []
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and "loss" in getattr(df, "columns", []):
        history = [float(x) for x in df["loss"].tolist()]
    return {"model": str(out_model), "metrics": metrics, "loss": metrics.get("loss"), "loss_history": history,
            "steps": tcfg.optim.max_steps, "method": tcfg.loss.method}


def _train_linked(tc: T.TrainConfig, cfg: EvolveConfig, sdir: Path, r: int, stage: str, model: Path, data: str):
    return merge(tc, {"model": {"path": str(model)}, "data": {"path": str(data)},
                      "run": {"name": f"{cfg.run.name}-r{r:03d}-{stage}", "storage_path": str(sdir / "ray"),
                              "export_dir": ""}})


def stage_sft(cfg, r, ckpt, director_stats, sdir) -> dict:
    """(b) Full fine-tuning of ``ckpt`` on the curated set."""
    import pyarrow.parquet as pq

    data = director_stats["sft_data"]
    tcfg = _train_linked(cfg.sft, cfg, sdir, r, "sft", ckpt, data)
    out = fit_and_copy(tcfg, sdir / "model")
    out["rows"] = pq.read_metadata(data).num_rows
    return out


def stage_prefs(cfg: EvolveConfig, r: int, model: Path, sdir: Path, spend_teachers) -> dict:
    """(c) Preference data of ``model``: Syn-Pic (ranked) or OSPO (pairs)."""
    import pyarrow.parquet as pq

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
        summary = S.run(scfg)
        if not summary["finished"]:
            raise RuntimeError(f"Syn-Pic stopped before the end (run.max_chunks?): {summary['output_dir']}")
        new = summary["this_run"]
        spend_teachers(sum(new["calls"][g] for g in new["calls"] if g.startswith("teacher:")),
                       sum(new["cost"][g] for g in new["cost"] if g.startswith("teacher:")))
        tot = summary["total"]
        data = str(sdir / "synpic" / "data")
        table = pq.read_table(data, columns=["scores", "reward_names", "generators"])
        return {
            "source": "synpic", "data": data, "rows": tot["rows"], "pairs": tot["pairs"], "images": tot["images"],
            "teacher_calls": {g: tot["calls"][g] for g in tot["calls"] if g.startswith("teacher:")},
            "teacher_cost": {g: tot["cost"][g] for g in tot["cost"] if g.startswith("teacher:")},
            "model_images": sum(tot["calls"][g] for g in tot["calls"] if g.startswith("checkpoint:")),
            "mean_rewards": synpic_mean_rewards(table),
        }
    job = load_job("build_ospo")
    ocfg = merge(cfg.ospo, {
        "generate": {"generator": spec, "num_inference_steps": cfg.model.steps, "guidance_scale": cfg.model.guidance,
                     "seed": cfg.ospo.generate.seed + 1000 * cfg.run.seed + r},
        "run": {"output": str(sdir / "ospo.tmp" / "ospo.parquet"), "round_index": r, "rounds": 1},
    })
    scorer = O.VQAScorer(ocfg.judge.backend, ocfg.filter.yes_threshold, **ocfg.judge.kwargs())
    rows, records, summary = job.build_round(ocfg, spec, scorer)
    if not rows:
        raise RuntimeError(f"OSPO kept no pair for round {r} (see the filter counts): {summary}")
    shutil.rmtree(sdir / "ospo.tmp", ignore_errors=True)
    summary = job.write_outputs(ocfg.run.output, rows, records, summary)
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


def stage_train(cfg, r, sft_model: Path, prefs_stats, sdir) -> dict:
    """(d) Preference training of the SFT model -> the round's checkpoint."""
    tcfg = _train_linked(cfg.train, cfg, sdir, r, "train", sft_model, prefs_stats["data"])
    return fit_and_copy(tcfg, sdir / "model")


def stage_eval(cfg: EvolveConfig, ckpt: Path, sdir: Path) -> dict:
    """(e) ShapesEval (written to ``sdir``: images/, manifest.jsonl, scores.json), mean analytic rewards
    of its images, and the report's fixed samples (``sdir/samples/``)."""
    from raypref.generators import PipelineGenerator
    from raypref.prefdata import decode_png, encode_png
    from raypref.shapes.evaluate import run_eval
    from raypref.shapes.score import aesthetic, faithfulness

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
            "shapes": scores["shapes"],
            "mean_rewards": {"faithfulness": sum(faith) / len(faith), "aesthetic": sum(aes) / len(aes)},
            "dir": str(sdir)}


# ------------------------------------------------------------------------------------------ rounds
def run_round(cfg: EvolveConfig, run_dir: Path, r: int, ckpt: Path, judge: ServedJudge, spend: _Spend) -> dict:
    """Run (or finish) round ``r`` from checkpoint ``ckpt``; returns its manifest (also written)."""
    rdir = round_dir(run_dir, r)
    rdir.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    ran: dict = {}
    if r > 0:
        _log(cfg, f"round {r}: director")
        stats["director"], ran["director"] = run_stage(
            rdir, "director", lambda sdir: stage_director(cfg, run_dir, r, ckpt, judge, sdir))
        if ran["director"]:
            spend.add(r, "director", **stats["director"]["spent_by_this_invocation"])
        _log(cfg, f"round {r}: sft")
        stats["sft"], ran["sft"] = run_stage(rdir, "sft", lambda sdir: stage_sft(cfg, r, ckpt, stats["director"], sdir))
        if ran["sft"]:
            spend.add(r, "sft")
        sft_model = Path(stats["sft"]["model"])
        _log(cfg, f"round {r}: prefs ({cfg.prefs.source})")
        paid = {"calls": 0, "cost": 0.0}

        def on_spend(calls, cost):
            paid["calls"], paid["cost"] = calls, cost

        stats["prefs"], ran["prefs"] = run_stage(rdir, "prefs", lambda sdir: stage_prefs(cfg, r, sft_model, sdir, on_spend))
        if ran["prefs"]:
            spend.add(r, "prefs", paid["calls"], paid["cost"])
        _log(cfg, f"round {r}: train ({cfg.train.loss.method})")
        stats["train"], ran["train"] = run_stage(rdir, "train", lambda sdir: stage_train(cfg, r, sft_model,
                                                                                         stats["prefs"], sdir))
        if ran["train"]:
            spend.add(r, "train")
        new_ckpt = Path(stats["train"]["model"])
    else:
        new_ckpt = ckpt
    _log(cfg, f"round {r}: eval")
    stats["eval"], ran["eval"] = run_stage(rdir, "eval", lambda sdir: stage_eval(cfg, new_ckpt, sdir))
    if ran["eval"]:
        spend.add(r, "eval")
    manifest = build_manifest(cfg, r, ckpt, new_ckpt, stats)
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


def run(cfg: EvolveConfig) -> list[dict]:
    """All rounds of ``cfg``, resuming after the last finished one. Ray must be initialised.
    Returns the manifests of rounds 0..run.rounds."""
    from raypref.generators import resolve_checkpoint

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
    spend = _Spend(run_dir)
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
            manifests[r] = run_round(cfg, run_dir, r, ckpt, judge, spend)
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

    parser = build_parser()
    args = parser.parse_args(argv)
    return load_config(PRESETS[args.preset](), args.config, args.overrides)


def build_parser(parser=None):
    import argparse

    parser = parser or argparse.ArgumentParser(
        prog="evolve_and_train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="shapes_cpu", choices=sorted(PRESETS),
                        help="starting config: shapes_cpu (default; 2-core CPU, shipped base model), tiny_test "
                             "(seconds, tests), sdxl_8xh100 / sd3_8xh100 (documented GPU examples)")
    parser.add_argument("--config", help="YAML file applied over the preset (same nesting as the config)")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value applied last, e.g. run.rounds=2 run.output_dir=/tmp/ev "
                             "model.base=/path/to/pipeline prefs.source=ospo train.loss.method=rankdpo "
                             "sft.optim.max_steps=100 eval.n_per_category=30")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse the config, connect to Ray (RAY_ADDRESS) or start a local one (run.num_cpus), run."""
    import ray

    cfg = parse_config(argv)
    started = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:  # a running cluster (ray job submit sets this): its resources, never ours
            ray.init(address=address)
        else:  # a fresh local Ray, never an unrelated running one
            # workers (the served judge lives in serve/judge.py) import from the repo root
            paths = [str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
            os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
            ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=False)
        started = True
    try:
        manifests = run(cfg)
    finally:
        if started:
            ray.shutdown()
    print(json.dumps([{"round": m["round"], "overall": m["scores"]["overall"], "checkpoint": m["checkpoint"]}
                      for m in manifests], indent=1))
    return manifests
