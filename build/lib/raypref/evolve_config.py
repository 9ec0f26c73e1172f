"""The evolve driver's config: its own sections, the nested stage configs, and the presets.

The driver's sections (``run``, ``model``, ``judge_serve``, ``prefs``, ``eval``) say what links the
stages; each stage reads the sizes of its own nested config (``director``, ``sft``, ``synpic`` /
``ospo``, ``train``). The nested fields the driver sets every round are ``LINKED``: setting one is an
error, never silently overwritten.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from raypref import director_config, synpic_config, train_config
from raypref.config import check, merge
from raypref.judges import JudgeSection
from raypref.ospo_config import OSPOConfig
from raypref.raytrain import RunSection as TrainRunSection

PREF_METHODS = ("dpo", "rankdpo", "balanced")
PREF_SOURCES = ("synpic", "ospo")
# Fields of the nested stage configs that the driver sets every round from its own sections (paths,
# the current checkpoint, image size, sampler): a user who sets one gets an error naming it, since the
# value would be overwritten. (synpic.generators.specs is the user's: the driver appends the model.)
LINKED = (
    "director.data.directory", "director.data.image_size", "director.models.base", "director.models.base_steps",
    "director.models.base_guidance", "sft.model.path", "sft.data.path", "sft.run.name", "sft.run.storage_path",
    "sft.run.export_dir", "synpic.generators.image_size", "synpic.generators.num_inference_steps",
    "synpic.generators.guidance_scale", "synpic.run.output_dir", "ospo.generate.generator",
    "ospo.generate.num_inference_steps", "ospo.generate.guidance_scale", "ospo.run.output", "ospo.run.round_index",
    "train.model.path", "train.data.path", "train.run.name", "train.run.storage_path", "train.run.export_dir",
)
REPORT_PROMPTS = (  # one per ShapesEval category
    "a circle", "a square and a triangle", "three circles", "a blue square", "a triangle left of a square",
    "a red circle and a cyan triangle",
)


def _section_default(section, leaf: str):
    f = {f.name: f for f in dataclasses.fields(section)}[leaf]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def unlinked(nested, name: str):
    """``nested`` (the config of stage ``name``: "sft", "train", "synpic", ...) with the fields the driver
    links reset to their defaults: how a preset reuses a standalone job's config as a stage's."""
    updates: dict = {}
    for path in LINKED:
        stage, *parents, leaf = path.split(".")
        if stage != name:
            continue
        section = nested
        for p in parents:
            section = getattr(section, p)
        node = updates
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _section_default(section, leaf)
    return merge(nested, updates)


def _is_default(cfg, path: str) -> bool:
    """Whether the field at dotted ``path`` holds its section dataclass's default value."""
    *parents, leaf = path.split(".")
    section = cfg
    for p in parents:
        section = getattr(section, p)
    return getattr(section, leaf) == _section_default(section, leaf)


@dataclass(frozen=True)
class RunSection:
    name: str = "evolve-shapes"
    output_dir: str = "~/raypref_runs/evolve-shapes"
    rounds: int = field(
        default=3, metadata={"help": "rounds after round 0 (the evaluation of the starting checkpoint)"}
    )
    seed: int = field(default=0, metadata={"help": "mixed into the per-round seeds of Syn-Pic / OSPO"})
    num_cpus: float = field(
        default=4.0, metadata={"help": "logical CPUs of a LOCAL Ray (ignored with RAY_ADDRESS); > cores is fine"}
    )
    report: bool = field(default=True, metadata={"help": "write report.md after every round"})
    progress: bool = True

    def __post_init__(self):
        check(bool(self.name), "run.name must not be empty")
        check(bool(self.output_dir), "run.output_dir must not be empty")
        check(0 <= self.rounds <= 999, f"run.rounds must be in [0, 999], got {self.rounds}")
        check(self.num_cpus > 0, f"run.num_cpus must be > 0, got {self.num_cpus}")


@dataclass(frozen=True)
class ModelSection:
    base: str = field(
        default="shipped",
        metadata={"help": "starting checkpoint: 'shipped', a diffusers pipeline dir or a Ray Train checkpoint"},
    )
    steps: int = field(
        default=30, metadata={"help": "sampling steps of every checkpoint (director base, Syn-Pic/OSPO, eval, report)"}
    )
    guidance: float = 3.0

    def __post_init__(self):
        check(bool(self.base), "model.base must not be empty")
        check(self.steps >= 1, f"model.steps must be >= 1, got {self.steps}")
        check(self.guidance >= 0, f"model.guidance must be >= 0, got {self.guidance}")


@dataclass(frozen=True)
class JudgeServeSection:
    """The director's judge as a Serve app (backend and its options: ``director.judge``)."""

    app_name: str = "evolve-judge"
    num_cpus: float = field(
        default=0.25, metadata={"help": "per replica; fractional so it never starves training on 2 cores"}
    )
    num_gpus: float = 0.0
    replicas: int = 1
    max_batch_size: int = 16
    proxy_location: str = field(
        default="Disabled", metadata={"help": 'the driver only uses a handle; "HeadOnly" also serves HTTP'}
    )

    def __post_init__(self):
        check(bool(self.app_name), "judge_serve.app_name must not be empty")
        check(self.num_cpus > 0 and self.num_gpus >= 0, "judge_serve.num_cpus must be > 0, num_gpus >= 0")
        check(self.replicas >= 1, f"judge_serve.replicas must be >= 1, got {self.replicas}")
        check(self.max_batch_size >= 1, f"judge_serve.max_batch_size must be >= 1, got {self.max_batch_size}")
        check(self.proxy_location in ("Disabled", "HeadOnly", "EveryNode"),
              f"judge_serve.proxy_location must be Disabled|HeadOnly|EveryNode, got {self.proxy_location!r}")


@dataclass(frozen=True)
class PrefsSection:
    source: str = field(
        default="synpic",
        metadata={"help": "synpic (ranked K images; balanced uses its consensus pairs) | ospo (pairs)"},
    )

    def __post_init__(self):
        check(self.source in PREF_SOURCES, f"prefs.source must be one of {PREF_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class EvalSection:
    n_per_category: int = field(default=20, metadata={"help": "ShapesEval prompts per category"})
    seed: int = field(default=0, metadata={"help": "fixed: every round is scored on the same prompts and seeds"})
    batch_size: int = 64
    report_prompts: tuple[str, ...] = field(
        default=REPORT_PROMPTS, metadata={"help": "the report's before/after grid (same every round)"}
    )
    report_seed: int = 1234

    def __post_init__(self):
        check(self.n_per_category >= 1, f"eval.n_per_category must be >= 1, got {self.n_per_category}")
        check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        check(len(self.report_prompts) >= 1, "eval.report_prompts must hold at least one prompt")


@dataclass(frozen=True)
class EvolveConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    director: director_config.DirectorConfig = field(default_factory=director_config.DirectorConfig)
    judge_serve: JudgeServeSection = field(default_factory=JudgeServeSection)
    sft: train_config.TrainConfig = field(default_factory=lambda: train_recipe("sft", 60, 1e-3))
    prefs: PrefsSection = field(default_factory=PrefsSection)
    synpic: synpic_config.SynPicConfig = field(default_factory=synpic_config.SynPicConfig)
    ospo: OSPOConfig = field(default_factory=OSPOConfig)
    train: train_config.TrainConfig = field(default_factory=lambda: train_recipe("dpo", 40, 1e-4, sft_weight=500.0))
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self):
        for path in LINKED:
            check(_is_default(self, path), f"{path} is set by the driver every round (from run, model and the "
                                           f"current checkpoint); remove it from the config")
        check(self.sft.loss.method == "sft", f"sft.loss.method must be 'sft', got {self.sft.loss.method!r}")
        check(self.train.loss.method in PREF_METHODS,
              f"train.loss.method must be one of {PREF_METHODS}, got {self.train.loss.method!r}")


# LoRA on the shapes UNet's attention, feed-forward and resnet convolutions: most of its capacity (and
# all of its drawing at full latent resolution) is convolutional, which attention alone cannot move.
SHAPES_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                       "conv1", "conv2")


def train_recipe(method: str, steps: int, lr: float, batch: int = 16, cpus: float = 1.0, lora: bool = True,
               rank: int = 16, sft_weight: float = 0.0) -> train_config.TrainConfig:
    return train_config.TrainConfig(
        model=train_config.ModelSection(
            lora=lora, lora_rank=rank, lora_alpha=float(rank), lora_targets=SHAPES_LORA_TARGETS
        ),
        loss=train_config.LossSection(method=method, sft_weight=sft_weight),
        optim=train_config.OptimSection(lr=lr, warmup_steps=min(10, steps // 5), batch_size=batch, max_steps=steps),
        # max_failures: a worker lost to an overloaded node restarts from the last checkpoint
        run=TrainRunSection(
            num_workers=1,
            cpus_per_worker=cpus,
            checkpoint_every=steps,
            log_every=10,
            keep_checkpoints=1,
            max_failures=2,
        ),
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
        director=director_config.DirectorConfig(
            data=director_config.DataSection(n_per_category=4, init_teacher="tournament"),
            round=director_config.RoundSection(
                rounds=999, sample_fraction=0.5, n_expand=2, p_mutate=0.2, batch_size=64
            ),
            models=director_config.ModelsSection(teachers=("prism", "quill", "vellum", "zephyr")),
            judge=JudgeSection(error_rate=0.1),
            run=director_config.RunSection(name="evolve-director"),
        ),
        sft=train_recipe("sft", 60, 1e-3),
        synpic=dataclasses.replace(
            synpic_config.shapes_cpu(),
            prompts=synpic_config.PromptsSection(n_per_category=4),
            generators=synpic_config.GeneratorsSection(specs=("teacher:prism", "teacher:quill"), batch_size=32),
            run=synpic_config.RunSection(chunk_size=64, window_chunks=0, progress=False),
        ),
        train=train_recipe("dpo", 40, 1e-4, sft_weight=500.0),
        eval=EvalSection(n_per_category=50, seed=0),
    )


def sdxl_8xh100() -> EvolveConfig:
    """Example (not run here): SDXL on 8 x H100 with a VLM judge behind an OpenAI-compatible endpoint.

    Teachers are checkpoint generators (local diffusers snapshots), the judge a served VLM (vLLM or
    Ray Serve LLM at ``base_url``), Syn-Pic ranks 4 teachers + the model with learned rewards, and both
    trainings use the SDXL Diffusion-DPO recipe of ``raypref.train.sdxl_8xh100`` (full fine-tuning,
    8 workers, bf16). ``run.output_dir`` and the trainings' storage must be shared storage.
    """
    big = train_config.sdxl_8xh100()
    return EvolveConfig(
        run=RunSection(name="evolve-sdxl", output_dir="/mnt/shared/evolve-sdxl", rounds=5),
        model=ModelSection(base="/models/stable-diffusion-xl-base-1.0", steps=30, guidance=5.0),
        director=director_config.DirectorConfig(
            data=director_config.DataSection(n_per_category=500, init_teacher="tournament"),
            round=director_config.RoundSection(
                rounds=999, sample_fraction=0.25, n_expand=4, p_mutate=0.2, batch_size=16
            ),
            models=director_config.ModelsSection(
                teachers=("checkpoint:/models/flux.1-dev", "checkpoint:/models/sd3.5-large")
            ),
            judge=JudgeSection(
                backend="openai",
                model="Qwen/Qwen2.5-VL-72B-Instruct",
                base_url="http://vlm-judge:8000/v1",
                call_cost=0.002,
            ),
        ),
        judge_serve=JudgeServeSection(num_cpus=1.0, replicas=4, max_batch_size=32, proxy_location="HeadOnly"),
        sft=unlinked(merge(big, {"loss": {"method": "sft"}, "optim": {"max_steps": 1000}}), "sft"),
        synpic=dataclasses.replace(
            synpic_config.shapes_cpu(),
            prompts=synpic_config.PromptsSection(source="/mnt/shared/prompts.txt", grammar="none"),
            generators=synpic_config.GeneratorsSection(
                specs=("checkpoint:/models/flux.1-dev", "checkpoint:/models/sd3.5-large"),
                num_gpus=1.0,
                num_cpus=4.0,
                pool_size=2,
            ),
            rewards=synpic_config.RewardsSection(
                specs=("pickscore:/models/pickscore", "hpsv2:/models/hpsv2", "imagereward:/models/imagereward"),
                num_gpus=0.5,
                num_cpus=2.0,
            ),
            run=synpic_config.RunSection(chunk_size=1024, progress=True),
        ),
        train=unlinked(merge(big, {"loss": {"method": "rankdpo"}}), "train"),
        eval=EvalSection(n_per_category=50),
    )


def sd3_8xh100() -> EvolveConfig:
    """Example (not run here): as :func:`sdxl_8xh100` with SD3-medium (flow matching) as the model."""
    cfg = sdxl_8xh100()
    path = "/models/stable-diffusion-3-medium-diffusers"
    return merge(cfg, {"run": {"name": "evolve-sd3", "output_dir": "/mnt/shared/evolve-sd3"},
                       "model": {"base": path, "guidance": 7.0}})


PRESETS = {"shapes_cpu": shapes_cpu, "sdxl_8xh100": sdxl_8xh100, "sd3_8xh100": sd3_8xh100}
